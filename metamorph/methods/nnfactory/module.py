"""The LightningModules of NN-Factory's two one-time training stages.

:class:`SupernetModule` fine-tunes the modular supernet with a random seen task and a random
module mask per step, so every module works when switched on conditionally: cross-entropy on the
batch's images of the task (logits restricted to the task's classes) plus distillation from the
frozen full network restricted to the same classes on every image of the batch (off-task images
still tell the subset how the full network ranks the task's classes).

:class:`AssemblerModule` trains the assembler G with the supernet frozen (``freeze_supernet``
false: jointly, an ablation): per step a seen task and ``s ~ U[0, max_sparsity]``, G's hard mask
(straight-through), the same two losses against the full supernet.

Both draw a step's (task, sparsity, mask) from a generator seeded by ``(seed, global_step)``, so
a run resumed from ``last.ckpt`` draws what the uninterrupted run would have, and only from the
split's seen tasks (``trained_tasks`` records every task a training step used).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from metamorph.methods.nnfactory.assembler import Assembler
from metamorph.methods.nnfactory.class_tasks import (
    Task,
    TaskSplit,
    multi_hot,
    restrict,
    task_labels,
)
from metamorph.methods.nnfactory.config import AssemblerConfig, SupernetConfig
from metamorph.methods.nnfactory.supernet import ModularSupernet, random_mask
from metamorph.models.distill import kl_distillation
from metamorph.runtime.checkpoints import KIND_KEY
from metamorph.tasks.optim import lightning_optimizers

SUPERNET_KIND = "nnfactory_supernet"
ASSEMBLER_KIND = "nnfactory_assembler"


def task_losses(
    logits: torch.Tensor,
    teacher: torch.Tensor,
    y: torch.Tensor,
    task: Task,
    t: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ce, kd, correct_fraction)`` restricted to ``task``: CE over the task's images, KD (at
    temperature ``t``, scaled by ``t^2``) over every image."""
    s, tt = restrict(logits, task), restrict(teacher, task)
    kd = kl_distillation(s, tt, t) * (t * t)
    hit, local = task_labels(y, task)
    if hit.any():
        ce = F.cross_entropy(s[hit], local[hit])
        acc = (s[hit].argmax(1) == local[hit]).float().mean()
    else:
        ce = acc = s.sum() * 0.0
    return ce, kd, acc


def fixed_probes(split: TaskSplit, n: int, seed: int) -> list[Task]:
    rng = np.random.default_rng([seed, 1234])
    return [split.sample_seen(rng) for _ in range(n)]


class _Probed(L.LightningModule):
    """Validation (and test) over a few fixed probes: ``val/task_acc``, the task accuracy over
    the probes' images (logits restricted to each probe's task), also logged as ``val/acc``
    (what the checkpoint callback and sweeps monitor)."""

    def _init_probes(self, n: int) -> None:
        self.val_task = torchmetrics.MeanMetric()
        self.test_task = torchmetrics.MeanMetric()
        self.val_acc = torchmetrics.MeanMetric()  # the same figure under val/acc (checkpointing)
        self.n_probes = int(n)

    def _probe_step(self, x, y, forward_probe, stage: str = "val"):
        metric = self.val_task if stage == "val" else self.test_task
        for i in range(self.n_probes):
            task, logits = forward_probe(i, x)
            hit, local = task_labels(y, task)
            if hit.any():
                acc = (restrict(logits[hit], task).argmax(1) == local[hit]).float().mean()
                metric.update(acc * 100.0, weight=int(hit.sum()))
                if stage == "val":
                    self.val_acc.update(acc * 100.0, weight=int(hit.sum()))
        self.log(f"{stage}/task_acc", metric, on_epoch=True, prog_bar=stage == "val")
        if stage == "val":
            self.log("val/acc", self.val_acc, on_epoch=True)

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx, stage="test")


class SupernetModule(_Probed):
    def __init__(
        self,
        supernet: ModularSupernet,
        teacher: nn.Module,
        split: TaskSplit,
        cfg: SupernetConfig,
        seed: int = 0,
        hparams: dict | None = None,
    ) -> None:
        super().__init__()
        self.supernet = supernet
        self.teacher = teacher.eval().requires_grad_(False)
        self.split = split
        self.cfg = cfg
        self.seed = int(seed)
        self.save_hyperparameters(hparams or {}, logger=True)
        self.trained_tasks: set[Task] = set()
        self._init_probes(cfg.probes)
        self.probes = fixed_probes(split, cfg.probes, seed)
        prng = np.random.default_rng([seed, 99])
        self.probe_masks = [
            random_mask(supernet.num_modules, 0.5, prng) for _ in range(len(self.probes))
        ]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def draw(self, step: int) -> tuple[Task, float, tuple[int, ...]]:
        """The (task, sparsity, mask) of training step ``step``."""
        rng = np.random.default_rng([self.seed, int(step)])
        task = self.split.sample_seen(rng)
        if rng.random() < self.cfg.full_prob:
            return task, 0.0, tuple([1] * self.supernet.num_modules)
        s = float(rng.uniform(0.0, self.cfg.max_sparsity))
        return task, s, random_mask(self.supernet.num_modules, s, rng)

    def training_step(self, batch, batch_idx):
        x, y = batch
        task, s, mask = self.draw(self.global_step)
        self.trained_tasks.add(task)
        with torch.no_grad():
            teacher = self.teacher(x)
        m = torch.tensor(mask, dtype=x.dtype, device=x.device)
        logits = self.supernet(x, m)
        ce, kd, acc = task_losses(logits, teacher, y, task, self.cfg.kd_temperature)
        loss = self.cfg.ce_weight * ce + self.cfg.kd_weight * kd
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/task_acc", acc * 100.0, on_step=False, on_epoch=True)
        self.log("train/sparsity", s, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx, stage: str = "val"):
        x, y = batch

        def probe(i, x):
            m = torch.tensor(self.probe_masks[i], dtype=x.dtype, device=x.device)
            return self.probes[i], self.supernet(x, m)

        self._probe_step(x, y, probe, stage)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[KIND_KEY] = SUPERNET_KIND

    def configure_optimizers(self):
        return lightning_optimizers(
            self, self.supernet.parameters(), self.cfg.optim, self.cfg.scheduler
        )


class AssemblerModule(_Probed):
    def __init__(
        self,
        supernet: ModularSupernet,
        assembler: Assembler,
        split: TaskSplit,
        cfg: AssemblerConfig,
        seed: int = 0,
        hparams: dict | None = None,
    ) -> None:
        super().__init__()
        self.supernet = supernet
        self.assembler = assembler
        self.split = split
        self.cfg = cfg
        self.seed = int(seed)
        self.save_hyperparameters(hparams or {}, logger=True)
        self.trained_tasks: set[Task] = set()
        if cfg.freeze_supernet:
            self.supernet.requires_grad_(False)
        self._init_probes(cfg.probes)
        self.probes = fixed_probes(split, cfg.probes, seed)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze_supernet:
            self.supernet.eval()
        return self

    def draw(self, step: int) -> tuple[Task, float]:
        rng = np.random.default_rng([self.seed, int(step)])
        return self.split.sample_seen(rng), float(rng.uniform(0.0, self.cfg.max_sparsity))

    def _mask(self, task: Task, s: float, device, noise: bool, step: int = 0) -> torch.Tensor:
        vec = multi_hot(task, self.assembler.num_classes, device=device)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        return self.assembler.mask(vec, s, self.cfg.mask_mode, self.cfg.tau, noise, gen)

    def training_step(self, batch, batch_idx):
        x, y = batch
        task, s = self.draw(self.global_step)
        self.trained_tasks.add(task)
        with torch.no_grad():
            teacher = self.supernet(x)
        mask = self._mask(task, s, x.device, noise=True, step=self.global_step)
        logits = self.supernet(x, mask)
        ce, kd, acc = task_losses(logits, teacher, y, task, self.cfg.kd_temperature)
        loss = self.cfg.ce_weight * ce + self.cfg.kd_weight * kd
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/task_acc", acc * 100.0, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx, stage: str = "val"):
        x, y = batch

        def probe(i, x):
            s = 0.3 if i % 2 == 0 else 0.6
            task = self.probes[i]
            return task, self.supernet(x, self._mask(task, s, x.device, noise=False))

        self._probe_step(x, y, probe, stage)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[KIND_KEY] = ASSEMBLER_KIND

    def configure_optimizers(self):
        params = list(self.assembler.parameters())
        if not self.cfg.freeze_supernet:
            params += list(self.supernet.parameters())
        return lightning_optimizers(self, params, self.cfg.optim, self.cfg.scheduler)
