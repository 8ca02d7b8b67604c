"""Optimizers and learning-rate schedules from typed configs."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from metamorph.config.schema import OptimConfig, SchedulerConfig


def build_optimizer(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose sgd or adamw")


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int, steps_per_epoch: int
) -> dict | None:
    """A Lightning ``lr_scheduler`` dict stepping every optimizer step, or ``None``."""
    total_steps = max(1, int(total_steps))
    if cfg.name == "none":
        return None
    if cfg.name == "onecycle":
        max_lrs = [g["lr"] for g in opt.param_groups]
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=max_lrs,
            total_steps=total_steps,
            pct_start=cfg.pct_start,
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
            cycle_momentum=isinstance(opt, torch.optim.SGD) and opt.defaults.get("momentum", 0) > 0,
        )
    elif cfg.name in ("cosine", "warmup_cosine"):
        warmup = int(cfg.warmup_epochs * steps_per_epoch)
        base = [g["lr"] for g in opt.param_groups]
        floor = [cfg.min_lr / b if b > 0 else 0.0 for b in base]

        def make(i: int):
            def f(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
                return floor[i] + (1 - floor[i]) * 0.5 * (1 + math.cos(math.pi * t))

            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [make(i) for i in range(len(base))])
    elif cfg.name == "multistep":
        milestones = [m * steps_per_epoch for m in cfg.milestones]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.gamma)
    else:
        raise ValueError(
            f"unknown scheduler {cfg.name!r}; choose none, cosine, warmup_cosine, onecycle or multistep"
        )
    return {"scheduler": sched, "interval": "step", "frequency": 1}
