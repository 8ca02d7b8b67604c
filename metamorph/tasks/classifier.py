"""LightningModule training or fine-tuning a plain classifier (``task=pretrain``)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from metamorph.config.schema import OptimConfig, SchedulerConfig
from metamorph.tasks.optim import build_optimizer, build_scheduler


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

    def configure_optimizers(self):
        opt = build_optimizer(self.net.parameters(), self.optim_cfg)
        total = self.trainer.estimated_stepping_batches
        per_epoch = max(1, int(total // max(1, self.trainer.max_epochs or 1)))
        sched = build_scheduler(opt, self.sched_cfg, total, per_epoch)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}
