"""Short fine-tuning of searched networks: plain SGD on the train split (GeneCAI's D_FT / CP_FT:
4 epochs, lr 1e-3 divided by 10 from epoch 3, momentum 0.9, no weight decay)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class FinetuneConfig:
    epochs: int = 4
    max_steps: int | None = None  # cap on SGD steps (CPU budgets, tests); None = epochs only
    lr: float = 1.0e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [3])  # epochs where lr *= gamma
    gamma: float = 0.1
    batch_size: int = 128
    augment: bool = True
    train_subset: int | None = None  # use a seeded subset of the train split (None = all)

    def total_steps(self, n_images: int) -> int:
        per_epoch = max(1, math.ceil(n_images / self.batch_size))
        steps = self.epochs * per_epoch
        return steps if self.max_steps is None else min(steps, int(self.max_steps))


def finetune(model: nn.Module, dm, cfg: FinetuneConfig, seed: int = 0) -> dict:
    """Fine-tune ``model`` in place on ``dm``'s train split; returns a small report."""
    t0 = time.time()
    x_all, y_all = dm.split_tensors("train")
    g = torch.Generator().manual_seed(int(seed))
    if cfg.train_subset is not None and cfg.train_subset < len(y_all):
        idx = torch.randperm(len(y_all), generator=g)[: int(cfg.train_subset)]
        x_all, y_all = x_all[idx], y_all[idx]
    n = len(y_all)
    total = cfg.total_steps(n) if n else 0
    report = {"steps": 0, "epochs": 0.0, "loss": None, "seconds": 0.0}
    if total <= 0:
        return report
    device = next(model.parameters()).device
    model.requires_grad_(True)
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    per_epoch = max(1, math.ceil(n / cfg.batch_size))
    step, loss_ema = 0, None
    while step < total:
        epoch = step // per_epoch
        lr = cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        for group in opt.param_groups:
            group["lr"] = lr
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            if step >= total:
                break
            idx = perm[i : i + cfg.batch_size]
            x = dm.transform_batch(x_all[idx].to(device), augment=cfg.augment)
            loss = F.cross_entropy(model(x), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
    model.eval()
    report.update(
        steps=step, epochs=round(step / per_epoch, 3), loss=loss_ema, seconds=time.time() - t0
    )
    return report
