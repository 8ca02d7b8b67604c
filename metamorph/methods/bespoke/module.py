"""The retraining LightningModule: the chosen student distilled from the frozen teacher."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from metamorph.methods.bespoke.config import RetrainConfig
from metamorph.models.distill import kl_distillation
from metamorph.runtime.checkpoints import KIND_KEY
from metamorph.tasks.optim import lightning_optimizers

RETRAIN_KIND = "bespoke_retrain"


class RetrainModule(L.LightningModule):
    """``loss = w * T^2 * KL(teacher_T || student_T) + (1 - w) * CE(student, y)``; the teacher
    stays in eval mode and is not saved (it is the file ``task.teacher`` names)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        cfg: RetrainConfig,
        hparams: dict | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        if teacher is None and cfg.kd_weight > 0:
            raise ValueError("distillation (task.kd_weight > 0) needs a teacher")
        # a list: not a submodule, so not in the checkpoint; None: plain fine-tuning (kd_weight 0)
        self._teacher = [None if teacher is None else teacher.eval()]
        for p in teacher.parameters() if teacher is not None else ():
            p.requires_grad_(False)
        self.cfg = cfg
        self.save_hyperparameters(hparams or {}, logger=True)
        n = student.arch.num_classes
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(n, average="micro")

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def on_test_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.student(x)
        t, w = self.cfg.kd_temperature, self.cfg.kd_weight
        ce = F.cross_entropy(logits, y)
        if w > 0:  # with kd_weight 0 the teacher is not run (plain fine-tuning costs no more)
            with torch.no_grad():
                t_logits = self.teacher(x)
            kd = kl_distillation(logits, t_logits, t) * t * t
            loss = w * kd + (1 - w) * ce
            self.log("train/kd", kd)
        else:
            loss = ce
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce", ce)
        return loss

    def _eval(self, batch, metric, stage: str) -> None:
        x, y = batch
        logits = self.student(x)
        metric(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._eval(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, self.test_acc, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[KIND_KEY] = RETRAIN_KIND

    def configure_optimizers(self):
        return lightning_optimizers(
            self, self.student.parameters(), self.cfg.optim, self.cfg.scheduler
        )
