"""``metamorph-train``: train or fine-tune a plain network (task=pretrain) or a metamorphic INR
(task=metamorph), with a Lightning Trainer configured by Hydra."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from metamorph.cli.common import (
    CONF_DIR,
    build_datamodule,
    build_model,
    build_trainer,
    callback_metric,
    plain,
    report,
)
from metamorph.config.schema import OptimConfig, SchedulerConfig, typed
from metamorph.io.model_file import save_model
from metamorph.utils.profile import count_params


def run_pretrain(cfg: DictConfig) -> dict:
    t0 = time.time()
    L.seed_everything(cfg.seed, workers=True)
    from metamorph.tasks.classifier import ClassifierModule

    dm = build_datamodule(cfg.data, seed=cfg.seed)
    dm.prepare_data()
    dm.setup("fit")
    net = build_model(cfg.model, num_classes=dm.num_classes)
    dm.set_normalization(net.arch.mean, net.arch.std)
    module = ClassifierModule(
        net.train(),
        typed(OptimConfig, cfg.task.optim, "task.optim"),
        typed(SchedulerConfig, cfg.task.scheduler, "task.scheduler"),
        label_smoothing=cfg.task.get("label_smoothing", 0.0),
        hparams=plain(cfg),
    )
    trainer = build_trainer(cfg)
    out_dir = Path(cfg.paths.output_dir)
    print(
        f"[metamorph-train] task=pretrain model={cfg.model.name} params={count_params(net):,} -> {out_dir}"
    )
    summary: dict = {"task": "pretrain", "model": cfg.model.name, "output_dir": str(out_dir)}
    if cfg.train:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
        summary["val/acc"] = callback_metric(trainer, "val/acc")
        summary["global_step"] = trainer.global_step
    if cfg.test:
        trainer.test(module, datamodule=dm, verbose=False, weights_only=True)
        summary["test/acc"] = callback_metric(trainer, "test/acc")
    if trainer.is_global_zero and not trainer.fast_dev_run:
        net = module.net.eval().cpu()
        meta = {
            "val_acc": summary.get("val/acc"),
            "test_acc": summary.get("test/acc"),
            "name": cfg.name,
        }
        summary["model_file"] = str(save_model(net, out_dir / "model", meta=meta))
        if cfg.export_to:
            Path(cfg.export_to).parent.mkdir(parents=True, exist_ok=True)
            summary["exported"] = str(save_model(net, cfg.export_to, meta=meta))
    summary["time_s"] = round(time.time() - t0, 1)
    return summary


def run(cfg: DictConfig) -> dict:
    """Dispatch on ``task.name``; returns the summary dict (also printed as the last line)."""
    torch.set_float32_matmul_precision("high")
    task = cfg.task.name
    if task == "pretrain":
        summary = run_pretrain(cfg)
    elif task == "metamorph":
        from metamorph.tasks.metamorph_train import run_metamorph

        summary = run_metamorph(cfg)
    elif task == "slimmable":
        from metamorph.tasks.slimmable import run_slimmable

        summary = run_slimmable(cfg)
    else:
        raise ValueError(
            f"unknown task {task!r}; choose task=pretrain, task=metamorph or task=slimmable"
        )
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = run(cfg)
    report(summary)
    metric = summary.get(cfg.get("optimized_metric") or "val/acc")
    return metric


if __name__ == "__main__":
    main()
