"""Pieces shared by the entry points: building data, models and trainers from configs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from metamorph.config.locations import CONF_DIR  # noqa: F401  (re-exported for the entry points)
from metamorph.config.schema import DataConfig, ModelConfig, typed
from metamorph.models import create_model, fold_batchnorm
from metamorph.utils.checkpoint_io import AtomicCheckpointIO


def build_datamodule(cfg: DictConfig, mean=None, std=None, seed: int = 0):
    """The CIFAR datamodule described by ``cfg.data``, normalised like the model expects."""
    from metamorph.data import CIFARDataModule

    d: DataConfig = typed(DataConfig, cfg, "data")
    dm = CIFARDataModule(
        root=d.root,
        name=d.name,
        val_size=d.val_size,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        seed=seed,
        augment=d.augment,
        download=d.download,
        cache_dir=d.cache_dir,
        train_subset=d.train_subset,
        test_subset=d.test_subset,
    )
    if mean is not None:
        dm.set_normalization(mean, std)
    return dm


def load_any_model(path: str | os.PathLike) -> nn.Module:
    """A metamorph model file (.json/.safetensors) or a foreign akamaster checkpoint (.th)."""
    from metamorph.io.akamaster import akamaster_to_metamorph, load_untrusted_checkpoint
    from metamorph.io.model_file import load_model

    p = Path(path)
    if p.suffix in (".th", ".pth", ".pt", ".tar"):
        model, _ = akamaster_to_metamorph(load_untrusted_checkpoint(p))
        return model
    return load_model(p)


def build_model(cfg: DictConfig, num_classes: int | None = None) -> nn.Module:
    m: ModelConfig = typed(ModelConfig, cfg, "model")
    if m.init:
        model = load_any_model(m.init)
        if num_classes is not None and model.arch.num_classes != num_classes:
            raise ValueError(
                f"{m.init} has {model.arch.num_classes} classes but the data has {num_classes}; "
                "choose a checkpoint trained on this dataset"
            )
    else:
        kwargs = dict(m.kwargs)
        if num_classes is not None:
            kwargs.setdefault("num_classes", num_classes)
        model = create_model(m.name, **kwargs)
    if m.fold_bn:
        fold_batchnorm(model.eval())
    return model


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs (callbacks, loggers)."""
    out = []
    for _, c in (cfg or {}).items():
        if isinstance(c, DictConfig) and "_target_" in c:
            out.append(hydra.utils.instantiate(c))
    return out


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> L.Trainer:
    callbacks = instantiate_list(cfg.get("callbacks")) + list(extra_callbacks or [])
    loggers = instantiate_list(cfg.get("logger"))
    if not loggers:  # LearningRateMonitor refuses to run without a logger (logger=none)
        callbacks = [
            c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)
        ]
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available; use device=cpu")
    return torch.device(name)


def callback_metric(trainer: L.Trainer, key: str) -> float | None:
    """A logged metric of the last fit/test as a float, or ``None`` if it was not logged."""
    v = trainer.callback_metrics.get(key)
    return None if v is None else float(v)


def report(summary: dict) -> None:
    """Print a run summary: one readable line per figure, then the one-line JSON."""
    for k, v in summary.items():
        print(f"  {k:>14}: {v}")
    print_summary(summary)


def plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _clean(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def print_summary(summary: dict) -> None:
    """The last line of stdout of every entry point: a one-line JSON summary."""
    print(json.dumps(_clean(summary), sort_keys=True), flush=True)
