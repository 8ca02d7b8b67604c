"""All-or-nothing writes of a group of output files.

Every file of a group is written into a hidden staging folder beside its destination and moved
into place only after the whole group (and any checks on it) succeeded. A failure leaves no new
file behind: not the staging folder, not a half-written file, not a folder created for the output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn


def check_output_dir(folder: str | os.PathLike) -> Path:
    """Fail early, with a clear message, if ``folder`` could not be created or written.

    The folder itself may not exist yet (it is created when the outputs are committed); its
    nearest existing ancestor must be a writable directory.
    """
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(
            f"output directory {folder} cannot be written: {probe} is a file, not a directory"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(
            f"output directory {folder} cannot be written: {probe} is not writable; "
            "choose another output path"
        )
    return folder


class StagedOutputs:
    """Stage files for ``folder`` and move them in together on success.

    >>> with StagedOutputs("out/models") as st:
    ...     save_model(net, st.path("r20"))   # writes into the staging folder
    ...     st.commit()                       # moves r20.safetensors, r20.json into out/models

    Leaving the block without :meth:`commit` (or with an exception) deletes the staged files and
    any folders that were created for the outputs.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = check_output_dir(folder)
        self.stage: Path | None = None
        self.created: list[Path] = []
        self.committed: list[Path] = []

    def __enter__(self) -> StagedOutputs:
        missing = []
        p = self.folder
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            for d in reversed(missing):
                d.mkdir()
                self.created.append(d)
            self.stage = Path(tempfile.mkdtemp(prefix=".metamorph-staging-", dir=self.folder))
        except OSError as e:
            self._cleanup()
            raise PermissionError(
                f"output directory {self.folder} cannot be written ({e.strerror or e}); "
                "choose another output path"
            ) from e
        return self

    def path(self, name: str) -> Path:
        """Where to write the output file ``name`` (relative to the destination folder)."""
        if self.stage is None:
            raise RuntimeError("StagedOutputs.path() outside its `with` block")
        return self.stage / name

    def commit(self) -> list[Path]:
        """Move every staged file into the destination folder; returns their final paths."""
        assert self.stage is not None
        files = sorted(p for p in self.stage.rglob("*") if p.is_file() and p.suffix != ".tmp")
        for src in files:
            dst = self.folder / src.relative_to(self.stage)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            self.committed.append(dst)
        self.created = []  # the folders now hold outputs: keep them
        return list(self.committed)

    def _cleanup(self) -> None:
        if self.stage is not None and self.stage.exists():
            shutil.rmtree(self.stage, ignore_errors=True)
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                pass
        self.created = []

    def __exit__(self, exc_type, exc, tb) -> None:
        self._cleanup()


# ----------------------------------------------------------------------------------------------
# The files of metamorph-customize
# ----------------------------------------------------------------------------------------------

CUSTOMIZE_FORMATS = ("safetensors", "onnx")


def output_format(cfg: DictConfig) -> str:
    """``format`` of a metamorph-customize config, checked (a typo fails before any work)."""
    fmt = str(OmegaConf.select(cfg, "format", default="safetensors"))
    if fmt not in CUSTOMIZE_FORMATS:
        raise ValueError(f"format={fmt!r}: choose one of {', '.join(CUSTOMIZE_FORMATS)}")
    return fmt


def write_customized(
    model: nn.Module,
    out: str | os.PathLike,
    meta: dict,
    report: dict,
    cfg: DictConfig,
    class_names: list[str] | None = None,
) -> dict:
    """A customized model's files, all or nothing: ``<out>.safetensors/.json``,
    ``<out>.customize.json`` (``report`` plus the file entries) and with ``format=onnx``
    ``<out>.onnx`` (:func:`~metamorph.export.formats.export_onnx`: normalisation in the graph
    unless ``export.normalize_in_graph=false``, ``class_names`` in its metadata; checked with
    onnxruntime against PyTorch within ``onnx.atol``). Returns the file entries for the summary."""
    from metamorph.export.formats import check_onnx, export_onnx, input_spec
    from metamorph.io.atomic import atomic_write_text
    from metamorph.io.model_file import save_model

    fmt = output_format(cfg)
    out = Path(out)
    files: dict = {}
    nig = bool(OmegaConf.select(cfg, "export.normalize_in_graph", default=True))
    if fmt == "onnx":
        meta = {**meta, "input": input_spec(model, nig, class_names)}
    with StagedOutputs(out.parent) as st:
        js = save_model(model, st.path(out.name), meta=meta)
        files["model_file"] = str(out.parent / js.name)
        if fmt == "onnx":
            path = st.path(out.name + ".onnx")
            onnx = OmegaConf.select(cfg, "onnx", default=None) or {}
            files["onnx_exporter"] = export_onnx(
                model,
                path,
                opset=int(onnx.get("opset", 17)),
                exporter=str(onnx.get("exporter", "auto")),
                normalize_in_graph=nig,
                class_names=class_names,
            )
            diff = check_onnx(path, model, batch=int(onnx.get("batch", 8)), normalize_in_graph=nig)
            atol = float(onnx.get("atol", 1e-4))
            if not diff <= atol:
                raise ValueError(
                    f"the ONNX export's logits differ from PyTorch's by {diff:.3g} > "
                    f"onnx.atol={atol}; nothing was written"
                )
            files["onnx_max_abs_diff"] = diff
            files["onnx"] = str(out.parent / path.name)
        rep = st.path(out.name + ".customize.json")
        files["report"] = str(out.parent / rep.name)
        atomic_write_text(rep, json.dumps({**report, **files}, indent=1, default=str))
        st.commit()
    return files
