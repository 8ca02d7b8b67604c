"""Deployment formats for a materialised network: ONNX (checked with onnxruntime) and
``torch.export`` programs.

By default the exported graph takes images as users have them (float32 RGB in [0, 1], NCHW) and
normalises them itself (:class:`NormalizedInput`): a deployed model fed plain pixels must not
silently score near chance. ``normalize_in_graph=False`` exports the bare network, which expects
``(x - mean) / std``; either way the expected input is written into the ONNX metadata
(:func:`input_spec`) and the model's JSON.
"""

from __future__ import annotations

import importlib.util
import io
import os
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from torch import nn

from metamorph.data.sources import CIFAR10_CLASSES, IMAGE_SIZE

FORMATS = ("safetensors", "onnx", "export")


class NormalizedInput(nn.Module):
    """``net`` behind its own input normalisation: takes [0, 1] images, feeds ``(x - mean) / std``."""

    def __init__(self, net: nn.Module, mean, std) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def deployable(model: nn.Module, normalize_in_graph: bool = True) -> nn.Module:
    """The module that is exported: ``model`` with its normalisation in front (default) or bare."""
    if not normalize_in_graph:
        return model.eval().cpu()
    arch = model.arch
    return NormalizedInput(model.eval().cpu(), arch.mean, arch.std).eval()


def input_spec(
    model: nn.Module, normalize_in_graph: bool = True, class_names: list[str] | None = None
) -> dict:
    """What the exported graph expects as input (also written into the ONNX metadata)."""
    arch = model.arch
    if class_names is None and arch.num_classes == len(CIFAR10_CLASSES):
        class_names = list(CIFAR10_CLASSES)
    spec = {
        "layout": "NCHW",
        "dtype": "float32",
        "channels": "RGB",
        "size": [int(arch.in_channels), IMAGE_SIZE, IMAGE_SIZE],
        "mean": [float(m) for m in arch.mean],
        "std": [float(v) for v in arch.std],
        "normalize_in_graph": bool(normalize_in_graph),
        "range": "[0, 1] (pixel / 255)"
        if normalize_in_graph
        else "normalised: (pixel / 255 - mean) / std per channel",
        "output": f"logits [N, {arch.num_classes}]",
    }
    if class_names is not None:
        spec["class_names"] = list(class_names)
    return spec


def _random_batch(model: nn.Module, batch: int, seed: int, raw: bool = False) -> torch.Tensor:
    """A seeded batch: uniform [0, 1] images (``raw``) or standard-normal (normalised) input."""
    in_ch = model.arch.in_channels if hasattr(model, "arch") else 3
    g = torch.Generator().manual_seed(int(seed))
    if raw:
        return torch.rand(batch, in_ch, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return torch.randn(batch, in_ch, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def _reference(model: nn.Module, x: torch.Tensor, normalize_in_graph: bool) -> torch.Tensor:
    """What the PyTorch pipeline gives for ``x``: normalise [0, 1] images, then the network."""
    from metamorph.data.transforms import normalize

    with torch.no_grad():
        model = model.eval().cpu()
        return model(normalize(x, model.arch.mean, model.arch.std) if normalize_in_graph else x)


def onnx_exporter(requested: str = "auto") -> str:
    """``dynamo`` (needs onnxscript) or ``legacy`` (TorchScript-based, ``dynamo=False``)."""
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if requested == "auto":
        return "dynamo" if has_onnxscript else "legacy"
    if requested == "dynamo" and not has_onnxscript:
        raise ValueError(
            "onnx.exporter=dynamo needs the onnxscript package (pip install onnxscript); "
            "use onnx.exporter=legacy or auto"
        )
    if requested not in ("dynamo", "legacy"):
        raise ValueError(f"unknown onnx.exporter {requested!r}; choose auto, dynamo or legacy")
    return requested


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    opset: int = 17,
    exporter: str = "auto",
    normalize_in_graph: bool = True,
    metadata: dict | None = None,
    class_names: list[str] | None = None,
) -> str:
    """Write ``model`` as ONNX with a dynamic batch axis (input ``input``, output ``logits``),
    taking [0, 1] images unless ``normalize_in_graph=False``; :func:`input_spec` (plus
    ``metadata``) goes into the model's ``metadata_props``, one JSON string per key
    (``class_names``: the output's classes, e.g. a task model's subset).
    Returns the exporter used."""
    if importlib.util.find_spec("onnx") is None:
        raise ValueError("format=onnx needs the onnx package: pip install 'metamorph[export]'")
    kind = onnx_exporter(exporter)
    spec = input_spec(model, normalize_in_graph, class_names)
    x = _random_batch(model, 2, 0, raw=normalize_in_graph)
    model = deployable(model, normalize_in_graph)
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=int(opset))
    sink = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
        warnings.simplefilter("ignore")
        if kind == "legacy":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                **kwargs,
            )
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}}, **kwargs
            )
    write_onnx_metadata(path, {"metamorph_input": spec, **(metadata or {})})
    return kind


def write_onnx_metadata(path: str | os.PathLike, props: dict) -> None:
    """Set ONNX ``metadata_props`` (values JSON-encoded unless strings) and rewrite the file."""
    import json

    import onnx

    m = onnx.load(str(path))
    existing = {p.key: p for p in m.metadata_props}
    for key, value in props.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if key in existing:
            existing[key].value = text
        else:
            entry = m.metadata_props.add()
            entry.key, entry.value = key, text
    onnx.save(m, str(path))


def read_onnx_input_spec(path: str | os.PathLike) -> dict:
    """The :func:`input_spec` stored in an ONNX file by :func:`export_onnx` ({} if none)."""
    import json

    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for p in m.metadata_props:
        if p.key == "metamorph_input":
            return json.loads(p.value)
    return {}


def check_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    batch: int = 8,
    seed: int = 0,
    normalize_in_graph: bool = True,
) -> float:
    """Run the ONNX file with onnxruntime on a random batch ([0, 1] images when the graph
    normalises, else normalised input); max |logit difference| vs the PyTorch pipeline."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise ValueError(
            "checking the ONNX export needs onnxruntime: pip install 'metamorph[export]'"
        )
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = _random_batch(model, batch, seed, raw=normalize_in_graph)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    ref = _reference(model, x, normalize_in_graph)
    return float((torch.from_numpy(got) - ref).abs().max())


def export_program(
    model: nn.Module, path: str | os.PathLike, normalize_in_graph: bool = True
) -> None:
    """Write a ``torch.export`` program (``torch.export.save``) with a dynamic batch axis,
    taking [0, 1] images unless ``normalize_in_graph=False``."""
    x = _random_batch(model, 2, 0, raw=normalize_in_graph)
    model = deployable(model, normalize_in_graph)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))


def check_program(
    path: str | os.PathLike,
    model: nn.Module,
    batch: int = 8,
    seed: int = 0,
    normalize_in_graph: bool = True,
) -> float:
    """Load the saved program back; max |logit difference| vs the PyTorch pipeline on a random
    batch ([0, 1] images when the program normalises)."""
    program = torch.export.load(str(Path(path)))
    x = _random_batch(model, batch, seed, raw=normalize_in_graph)
    with torch.no_grad():
        got = program.module()(x)
    return float((got - _reference(model, x, normalize_in_graph)).abs().max())
