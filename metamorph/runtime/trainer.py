"""The Lightning Trainer of a run, with its callbacks and loggers, from the config."""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from metamorph.runtime.checkpoint_io import AtomicCheckpointIO


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs (callbacks, loggers)."""
    out = []
    for _, c in (cfg or {}).items():
        if isinstance(c, DictConfig) and "_target_" in c:
            out.append(hydra.utils.instantiate(c))
    return out


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> L.Trainer:
    """``cfg.trainer`` with ``cfg.callbacks`` / ``cfg.logger``; checkpoints written atomically."""
    callbacks = instantiate_list(cfg.get("callbacks")) + list(extra_callbacks or [])
    loggers = instantiate_list(cfg.get("logger"))
    if not loggers:  # LearningRateMonitor refuses to run without a logger (logger=none)
        callbacks = [
            c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)
        ]
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )


def callback_metric(trainer: L.Trainer, key: str) -> float | None:
    """A logged metric of the last fit/test as a float, or ``None`` if it was not logged."""
    v = trainer.callback_metrics.get(key)
    return None if v is None else float(v)
