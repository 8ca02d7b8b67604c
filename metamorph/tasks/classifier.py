"""``task=pretrain``: train or fine-tune a plain classifier (its LightningModule, its runner and
its checkpoint kind)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from omegaconf import DictConfig, OmegaConf
from torch import nn

from metamorph.config.schema import OptimConfig, SchedulerConfig, typed
from metamorph.io.model_file import save_model
from metamorph.runtime.checkpoints import (
    KIND_KEY,
    lightning_task,
    read_checkpoint,
    register_checkpoint_kind,
    submodule_state,
)
from metamorph.runtime.data import build_datamodule
from metamorph.runtime.networks import build_model
from metamorph.runtime.summary import plain
from metamorph.runtime.tasks import register_task
from metamorph.runtime.trainer import build_trainer, fit_and_test
from metamorph.tasks.optim import lightning_optimizers
from metamorph.utils.profile import count_params

CHECKPOINT_KIND = "pretrain"


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of ``net`` with torchmetrics accuracy on val and test."""

    def __init__(
        self,
        net: nn.Module,
        optim: OptimConfig,
        scheduler: SchedulerConfig,
        label_smoothing: float = 0.0,
        hparams: dict | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optim_cfg = optim
        self.sched_cfg = scheduler
        self.label_smoothing = label_smoothing
        # plain containers only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"config": hparams or {}}, logger=True)
        num_classes = net.arch.num_classes
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(
            num_classes, average="micro"
        )
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch, metric, stage: str):
        x, y = batch
        logits = self.net(x)
        metric(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_acc, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[KIND_KEY] = CHECKPOINT_KIND

    def configure_optimizers(self):
        return lightning_optimizers(self, self.net.parameters(), self.optim_cfg, self.sched_cfg)


@register_task("pretrain")
def run_pretrain(cfg: DictConfig) -> dict:
    """Train (``train``) and test (``test``) ``cfg.model``; writes ``model.safetensors/.json``."""
    t0 = time.time()
    L.seed_everything(cfg.seed, workers=True)
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
    fit_and_test(cfg, module, dm, summary, trainer=trainer)
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


def _is_pretrain(obj: dict) -> bool:
    hp = obj.get("hyper_parameters") or {}
    return lightning_task(obj) == "pretrain" and "metamorph" not in hp and "slimmable" not in hp


@register_checkpoint_kind(CHECKPOINT_KIND, sniff=_is_pretrain)
def load_pretrain_checkpoint(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """The plain network of a ``task=pretrain`` Lightning checkpoint (``weights_only``)."""
    ckpt = read_checkpoint(path, map_location)
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    model_cfg = cfg.model
    model_cfg.init = None
    net = build_model(model_cfg, num_classes=None)
    state = submodule_state(ckpt, "net.")
    net.load_state_dict(state)
    return net.eval()
