"""The LightningModules of Learngene Pool's two training stages (and of SN-Net's fine-tune).

:class:`AuxModule` distils one auxiliary model from the frozen ancestry
(:class:`~.auxiliary.AuxDistiller`: student and transformation layers optimised together).

:class:`StitchModule` fine-tunes a stitched system once: each step runs one descendant drawn
uniformly (official code: ``random.choice(stitch_cfg_ids)``) from a generator seeded by
``(seed, global_step)``, so a run resumed from ``last.ckpt`` draws what the uninterrupted run
would have; loss ``ce_weight CE + kd_weight T^2 KL(p_ancestry || p_descendant)`` (the PyTorch
port's 0.5 / 0.5, T = 1). Members and stitch layers are both updated, so descendants share
weights. Validation runs a few fixed descendants (``probes``) and logs their mean as ``val/acc``.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from metamorph.methods.learngene.auxiliary import AuxDistiller
from metamorph.methods.learngene.config import AuxConfig, StitchConfig
from metamorph.methods.learngene.pool import StitchedSystem
from metamorph.models.distill import kl_distillation
from metamorph.runtime.checkpoints import KIND_KEY
from metamorph.tasks.optim import lightning_optimizers

AUX_KIND = "learngene_aux"
STITCH_KIND = "learngene_stitch"
BN_STATS_MODES = ("train", "frozen")


class AuxModule(L.LightningModule):
    def __init__(self, distiller: AuxDistiller, cfg: AuxConfig, hparams: dict | None = None):
        super().__init__()
        self.distiller = distiller
        self.cfg = cfg
        self.save_hyperparameters(hparams or {}, logger=True)
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(
            int(distiller.student.arch.num_classes), average="micro"
        )
        self.test_acc = self.val_acc.clone()

    def forward(self, x):
        return self.distiller(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, parts = self.distiller.loss(x, y)
        self.log("train/loss", loss, prog_bar=True)
        for k, v in parts.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True)
        return loss

    def _eval(self, batch, metric, stage):
        x, y = batch
        metric.update(self.distiller(x), y)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch, batch_idx):
        self._eval(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, self.test_acc, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[KIND_KEY] = AUX_KIND

    def configure_optimizers(self):
        # the transformation layers are optimised with the student (not left at random init)
        params = [*self.distiller.student.parameters(), *self.distiller.transforms.parameters()]
        return lightning_optimizers(self, params, self.cfg.optim, self.cfg.scheduler)


def draw_path(seed: int, step: int, paths: list[int]) -> int:
    """The descendant trained at ``step``: uniform over ``paths``, seeded by (seed, step)."""
    rng = np.random.default_rng([int(seed), int(step)])
    return int(paths[int(rng.integers(len(paths)))])


class StitchModule(L.LightningModule):
    def __init__(
        self,
        system: StitchedSystem,
        teacher: nn.Module | None,
        cfg: StitchConfig,
        seed: int = 0,
        hparams: dict | None = None,
    ) -> None:
        super().__init__()
        self.system = system
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        self.cfg = cfg
        self.seed = int(seed)
        self.save_hyperparameters(hparams or {}, logger=True)
        n = system.num_descendants
        self.paths = list(range(n)) if cfg.paths is None else [int(p) for p in cfg.paths]
        self.probes = (
            [d.id for d in system.descendants if not d.stitched]
            if cfg.probes is None
            else [int(p) for p in cfg.probes]
        )
        for p in [*self.paths, *self.probes]:
            system.descendant(p)  # a bad id fails here, naming the valid range
        if cfg.bn_stats not in BN_STATS_MODES:
            raise ValueError(f"task.bn_stats={cfg.bn_stats!r}; choose one of {BN_STATS_MODES}")
        if not self.paths:
            raise ValueError("task.paths is empty: give descendant ids to train, or null for all")
        if self.teacher is None and cfg.kd_weight > 0:
            raise ValueError(
                "task.kd_weight > 0 needs task.ancestry= (the KD teacher); set task.kd_weight=0 "
                "to train without distillation"
            )
        self.val_metric = torchmetrics.MeanMetric()
        self.test_metric = torchmetrics.MeanMetric()
        self.trained_paths: list[int] = []

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        if mode and self.cfg.bn_stats == "frozen":
            # every descendant shares the members' BN layers: frozen, each path sees the
            # statistics its member was trained with instead of an average over all paths
            for m in self.system.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def training_step(self, batch, batch_idx):
        x, y = batch
        d = draw_path(self.seed, self.global_step, self.paths)
        self.trained_paths.append(d)
        logits = self.system(x, d)
        ce = F.cross_entropy(logits, y)
        loss = self.cfg.ce_weight * ce
        if self.teacher is not None and self.cfg.kd_weight > 0:
            with torch.no_grad():
                t_logits = self.teacher(x)
            t = self.cfg.temperature
            loss = loss + self.cfg.kd_weight * kl_distillation(logits, t_logits, t) * (t * t)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce", ce, on_step=False, on_epoch=True)
        return loss

    def _eval(self, batch, metric, stage):
        x, y = batch
        for d in self.probes:
            acc = (self.system(x, d).argmax(1) == y).float().mean() * 100.0
            metric.update(acc, weight=len(y))
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch, batch_idx):
        self._eval(batch, self.val_metric, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, self.test_metric, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[KIND_KEY] = STITCH_KIND

    def configure_optimizers(self):
        return lightning_optimizers(
            self, self.system.parameters(), self.cfg.optim, self.cfg.scheduler
        )
