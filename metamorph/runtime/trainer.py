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


def fit_and_test(
    cfg: DictConfig,
    module: L.LightningModule,
    dm: L.LightningDataModule,
    summary: dict,
    metric: str = "acc",
    trainer: L.Trainer | None = None,
) -> L.Trainer:
    """The fit (``cfg.train``, resuming from ``cfg.ckpt_path``) and test (``cfg.test``) passes
    every training task runs, recording ``train_time_s``, ``val/<metric>``, ``global_step`` and
    ``test/<metric>`` in ``summary``; checkpoints are loaded with ``weights_only`` (no pickled
    code runs)."""
    import time

    trainer = trainer or build_trainer(cfg)
    if cfg.train:
        t = time.time()
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
        summary["train_time_s"] = round(time.time() - t, 1)
        summary[f"val/{metric}"] = callback_metric(trainer, f"val/{metric}")
        summary["global_step"] = trainer.global_step
    if cfg.test:
        trainer.test(module, datamodule=dm, verbose=False, weights_only=True)
        summary[f"test/{metric}"] = callback_metric(trainer, f"test/{metric}")
    return trainer
