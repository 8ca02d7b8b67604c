"""The Python API of the main job: one object per metamorphic checkpoint, networks on demand.

>>> mm = metamorph.load_metamorphic("outputs/quickstart/metamorph/metamorph.ckpt")
>>> net = mm.sample(gamma=0.5)                               # uniform compression ratio
>>> net = mm.sample(hidden=[[16, 16, 16], [32, 32, 32], [64, 64, 40]])
>>> net = mm.sample(budget={"max_flops": 75e6}, data="../shared/data/cifar10-jpeg")
>>> rows = mm.sweep(gammas=[0, 0.25, 0.5], data="embedded:cifar10-mini")

It wraps the code behind ``metamorph-sample`` / ``metamorph-eval`` (:mod:`metamorph.export`), so a
network sampled here equals the one the command writes for the same target, K and seed. Sampled
networks are plain :class:`~metamorph.models.resnet_cifar.CifarResNet` modules that expect
normalised input (their ``arch.mean`` / ``arch.std``); :meth:`Metamorphic.save` writes them as
model files (and ONNX, which takes [0, 1] images).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_SUFFIXES = (".ckpt",)


class Metamorphic:
    """A trained metamorphic checkpoint: sample standalone networks by ratio, shape or budget.

    ``module`` is the checkpoint's :class:`~metamorph.tasks.metamorph.MetamorphModule`; ``k`` is
    its K-sample averaging at evaluation (the default of :meth:`sample` and :meth:`sweep`)."""

    def __init__(self, module, path: str | os.PathLike | None = None) -> None:
        self.module = module
        self.path = None if path is None else Path(path)

    # ------------------------------------------------------------------ what it can serve
    @property
    def net(self):
        return self.module.net

    @property
    def k(self) -> int:
        return int(self.module.cfg.eval_k)

    @property
    def full_shape(self) -> list[list[int]]:
        return self.net.full_shape

    @property
    def blocks(self) -> list[str]:
        """The metamorphic blocks (their widths, and with depth choices their presence, vary)."""
        return list(self.net.meta_blocks)

    @property
    def depth_choices(self) -> list[int]:
        return list(self.net.spec.depth_choices)

    @property
    def trained_gammas(self) -> tuple[float, float]:
        from metamorph.export.sweep import trained_gamma_range

        return trained_gamma_range(self.net)

    def shape(self, gamma: float | None = None, hidden=None, depth=None) -> list[list[int]]:
        """The checked shape of a ``gamma`` (optionally ``depth``) or ``hidden`` target."""
        from metamorph.export.sample import shape_for_target

        return shape_for_target(self.net, gamma=gamma, hidden=hidden, depth=depth)

    def __repr__(self) -> str:
        lo, hi = self.trained_gammas
        return (
            f"Metamorphic({self.path}, blocks={self.blocks}, trained gamma [{lo:g}, {hi:g}], "
            f"depth_choices={self.depth_choices or 'fixed'}, K={self.k})"
        )

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        gamma: float | None = None,
        *,
        hidden=None,
        depth=None,
        budget=None,
        data=None,
        k: int | None = None,
        seed: int = 0,
        split: str = "val",
        val_subset: int = 1000,
        eval_device: str = "cpu",
    ) -> nn.Module:
        """A standalone network at one target: ``gamma`` (with optional ``depth``), ``hidden``,
        or ``budget`` (a :class:`~metamorph.export.sample.Budget` or a dict of its fields, e.g.
        ``{"max_flops": 75e6}``, ``{"max_latency_ms": 1.0, "device": "cpu1_b1"}``: the most
        accurate candidate shape within it on ``val_subset`` images of ``split`` of ``data``,
        evaluated on ``eval_device``; latency and memory are measured on the budget's device
        profile, :mod:`metamorph.devices`). ``data``: a data root (``"embedded:cifar10-mini"``, a
        folder) or a :class:`~metamorph.data.CIFARDataModule`. The network's ``meta`` says how it
        was chosen."""
        from metamorph.export.sample import materialize

        targets = (("gamma", gamma), ("hidden", hidden), ("budget", budget))
        given = [name for name, value in targets if value is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one target: sample(gamma=0.5), sample(hidden=[[...], ...]) or "
                f"sample(budget={{'max_flops': 75e6}}, data=...); got {given or 'none'}"
            )
        k = self.k if k is None else int(k)
        if k < 1:
            raise ValueError(f"k={k} must be at least 1 (the number of averaged emissions)")
        meta: dict[str, Any] = {"source": "metamorph.api", "k": k, "seed": int(seed)}
        if budget is not None:
            if depth is not None:
                raise ValueError("depth= applies only with gamma=; a budget searches depths itself")
            shape, chosen = self._select(budget, data, k, seed, split, val_subset, eval_device)
            meta.update(target="budget", chosen=chosen.label, val_acc=chosen.acc)
        else:
            shape = self.shape(gamma=gamma, hidden=hidden, depth=depth)
            meta["target"] = "gamma" if gamma is not None else "hidden"
            if gamma is not None:
                meta["requested_gamma"] = float(gamma)
        model = materialize(self.module, shape, k=k, seed=int(seed))
        from metamorph.hypernet.evaluate import is_seen

        meta.update(shape=shape, gamma=round(self.net.gamma_of(shape), 6))
        meta["seen"] = is_seen(self.net, shape)
        if self.path is not None:
            meta["checkpoint"] = str(self.path.absolute())
        model.meta = meta
        return model

    def _select(self, budget, data, k, seed, split, val_subset, device):
        from metamorph.export.sample import (
            Budget,
            candidate_shapes,
            select_for_budget,
            val_batches,
        )
        from metamorph.runtime.device import resolve_device

        if isinstance(budget, dict):  # e.g. {"max_latency_ms": 1.0, "device": "ort_cpu1_b1"}
            budget = Budget.from_dict(dict(budget))
        if data is None:
            raise ValueError(
                "a budget ranks candidate shapes by accuracy, so it needs data: "
                "sample(budget=..., data='embedded:cifar10-mini') or a data folder"
            )
        dm = self._datamodule(data, seed, stage="fit")
        dev = resolve_device(device)
        self.module.to(dev)
        try:
            batches = val_batches(dm, split, val_subset, seed=seed, device=dev)
            cands = candidate_shapes(self.net)
            chosen, _ = select_for_budget(self.module, cands, budget, batches, k=k, seed=seed)
        finally:
            self.module.cpu()
        return chosen.hidden, chosen

    def _datamodule(self, data, seed: int, stage: str):
        from metamorph.data import CIFARDataModule

        arch = self.net.base_arch
        if isinstance(data, CIFARDataModule):
            dm = data
        elif isinstance(data, (str, os.PathLike)):
            name = {10: "cifar10", 100: "cifar100"}.get(arch.num_classes, "cifar10")
            # the embedded 5,000-image subset keeps 500 for validation, as conf/data/cifar10_mini
            val = {"val_size": 500} if str(data).startswith("embedded:") else {}
            dm = CIFARDataModule(root=str(data), name=name, seed=int(seed), **val)
        else:
            raise ValueError(
                f"data={data!r}: give a data root (e.g. 'embedded:cifar10-mini' or "
                "'../shared/data/cifar10-jpeg') or a metamorph.data.CIFARDataModule"
            )
        dm.set_normalization(arch.mean, arch.std)
        dm.setup(stage)
        if dm.num_classes != arch.num_classes:
            raise ValueError(
                f"the checkpoint has {arch.num_classes} classes but the data has {dm.num_classes}"
            )
        return dm

    # ------------------------------------------------------------------ sweeps and files
    def sweep(
        self,
        gammas=(0.0, 0.25, 0.5, 0.75),
        *,
        depths=(),
        data=None,
        split: str = "test",
        max_images: int | None = None,
        k: int | None = None,
        seed: int = 0,
        latency: bool = False,
        device: str = "cpu",
    ) -> list[dict]:
        """Accuracy (%), parameters, FLOPs (and CPU latency with ``latency=True``) of every
        ratio in ``gammas`` and uniform depth in ``depths``, on ``split`` of ``data``; one dict
        per shape, as the rows of ``metamorph-eval``'s ``sweep.csv``."""
        from metamorph.export.sweep import run_sweep
        from metamorph.runtime.device import resolve_device

        if data is None:
            raise ValueError("sweep needs data: sweep(data='embedded:cifar10-mini') or a folder")
        dm = self._datamodule(data, seed, stage="test" if split == "test" else "fit")
        dev = resolve_device(device)
        x, y = dm.split_tensors(split)
        if max_images is not None:
            x, y = dm.subset(split, int(max_images), seed=seed)
        batches = list(dm.normalized_batches((x, y), device=dev))
        self.module.to(dev)
        try:
            rows = run_sweep(
                self.module,
                batches,
                gammas=list(gammas),
                depths=list(depths),
                k=self.k if k is None else int(k),
                seed=int(seed),
                latency=latency,
            )
        finally:
            self.module.cpu()
        return [r.to_dict() for r in rows]

    def save(
        self, model: nn.Module, out: str | os.PathLike, format: str = "safetensors"
    ) -> list[Path]:
        """Write a sampled ``model`` as ``<out>.safetensors`` + ``<out>.json`` (``format="onnx"``
        adds ``<out>.onnx``, checked against onnxruntime, taking [0, 1] images); all or nothing."""
        from metamorph.export.formats import FORMATS, check_onnx, export_onnx, input_spec
        from metamorph.export.outputs import StagedOutputs
        from metamorph.io.model_file import save_model

        if format not in ("safetensors", "onnx"):
            raise ValueError(
                f"format={format!r}: Metamorphic.save writes safetensors or onnx "
                f"(metamorph-sample writes all of {', '.join(FORMATS)})"
            )
        out = Path(out)
        meta = dict(getattr(model, "meta", {}) or {})
        if format == "onnx":
            meta["input"] = input_spec(model)
        with StagedOutputs(out.absolute().parent) as st:
            save_model(model, st.path(out.name), meta=meta)
            if format == "onnx":
                path = st.path(out.name + ".onnx")
                export_onnx(model, path)
                diff = check_onnx(path, model)
                if not diff <= 1e-4:
                    raise ValueError(f"the ONNX export differs from PyTorch by {diff:.3g}")
            return st.commit()


def load_metamorphic(path: str | os.PathLike) -> Metamorphic:
    """Open a ``metamorph-train task=metamorph`` checkpoint (``weights_only=True``, no pickled
    code runs) for sampling: ``load_metamorphic(p).sample(gamma=0.5)``."""
    from metamorph.export.sample import load_metamorphic as load_module

    return Metamorphic(load_module(path), path)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """A standalone model file (``<name>.json`` + ``<name>.safetensors``), as written by
    ``metamorph-sample``, ``metamorph-convert`` and ``metamorph-train``. A metamorphic checkpoint
    is not a network but a generator of them: that case says what to call instead."""
    from metamorph.io.model_file import load_model
    from metamorph.runtime.checkpoints import is_model_file as _looks_like_model_file

    p = Path(path)
    if p.suffix in CHECKPOINT_SUFFIXES or (
        p.is_file() and p.suffix not in (".json", ".safetensors") and not _looks_like_model_file(p)
    ):
        raise ValueError(
            f"{p} is a checkpoint, not a model file. For a metamorphic checkpoint use "
            f"mm = metamorph.load_metamorphic('{p}') and then mm.sample(gamma=0.5) (or "
            "hidden=..., budget=...); metamorph.load reads the <name>.json model files that "
            "metamorph-sample and metamorph-convert write"
        )
    return load_model(p, map_location=map_location)
