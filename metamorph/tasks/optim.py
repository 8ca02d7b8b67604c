"""Optimizers and learning-rate schedules from typed configs."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from metamorph.config.schema import OptimConfig, SchedulerConfig

OPTIMIZERS = ("sgd", "adamw")


class AdamWWithSGDGroups(torch.optim.AdamW):
    """AdamW in which the param groups marked ``algo="sgd"`` take SGD-with-momentum steps
    (torch.optim.SGD's update, no dampening) with their own ``lr``, ``momentum``, ``nesterov`` and
    ``weight_decay``: an INR trained with AdamW beside slimmable-style shared weights trained
    with SGD, under one learning-rate schedule (each group keeps its own peak)."""

    def __init__(self, params: Iterable, **adamw_kwargs) -> None:
        super().__init__(params, **adamw_kwargs)
        for g in self.param_groups:
            algo = g.setdefault("algo", "adamw")
            if algo not in OPTIMIZERS:
                raise ValueError(f"param group algo={algo!r}; choose one of {OPTIMIZERS}")
            if algo == "sgd":
                missing = {"momentum", "nesterov"} - set(g)
                if missing:
                    raise ValueError(f"an algo='sgd' param group needs {sorted(missing)}")

    @staticmethod
    def _split(groups: list[dict]) -> tuple[list[dict], list[dict]]:
        return [g for g in groups if g.get("algo") != "sgd"], [
            g for g in groups if g.get("algo") == "sgd"
        ]

    def __setstate__(self, state: dict) -> None:  # Adam's expects Adam state in every group
        groups = state["param_groups"]
        super().__setstate__(dict(state, param_groups=self._split(groups)[0]))
        self.param_groups = groups

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        adam, sgd = self._split(groups)
        self.param_groups = adam
        try:
            super().step()
        finally:
            self.param_groups = groups
        with torch.no_grad():
            for g in sgd:
                self._sgd_step(g)
        return loss

    def _sgd_step(self, g: dict) -> None:
        lr, mom, wd = g["lr"], g["momentum"], g["weight_decay"]
        for p in g["params"]:
            if p.grad is None:
                continue
            d = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
            if mom != 0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(mom).add_(d)
                d = d.add(buf, alpha=mom) if g["nesterov"] else buf
            p.add_(d, alpha=-lr)


def optimizer_settings(cfg: OptimConfig) -> dict:
    """The torch keyword arguments of ``cfg``'s optimizer (lr, weight decay, and momentum /
    Nesterov for SGD or betas for AdamW); an unknown name is a clear error."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose sgd or adamw")
    settings = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name == "sgd":
        settings.update(momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    else:
        settings["betas"] = tuple(cfg.betas)
    return settings


def param_group(params: Iterable, cfg: OptimConfig) -> dict:
    """A param group with its own optimizer settings (``build_optimizer`` picks the class)."""
    return {"params": list(params), "algo": cfg.name, **optimizer_settings(cfg)}


def build_optimizer(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``cfg``'s optimizer over ``params``; groups made by :func:`param_group` keep their own
    algorithm: SGD groups inside an AdamW optimizer run on :class:`AdamWWithSGDGroups`."""
    settings = optimizer_settings(cfg)
    params = list(params)
    algos = {g.get("algo", cfg.name) for g in params if isinstance(g, dict)} | {cfg.name}
    if algos == {"adamw", "sgd"}:
        if cfg.name != "adamw":
            raise ValueError(
                "AdamW param groups inside an SGD optimizer are not supported: use adamw as the "
                "main optimizer (task.optim.name=adamw) with SGD groups, or one algorithm for all"
            )
        return AdamWWithSGDGroups(params, **settings)
    params = [
        {k: v for k, v in g.items() if k != "algo"} if isinstance(g, dict) else g for g in params
    ]
    optimizer = torch.optim.SGD if cfg.name == "sgd" else torch.optim.AdamW
    return optimizer(params, **settings)


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


def lightning_optimizers(module, params: Iterable, optim: OptimConfig, scheduler: SchedulerConfig):
    """What a LightningModule's ``configure_optimizers`` returns: ``optim`` over ``params`` and
    its per-step ``scheduler`` over the run's estimated stepping batches."""
    opt = build_optimizer(params, optim)
    total = module.trainer.estimated_stepping_batches
    per_epoch = max(1, int(total // max(1, module.trainer.max_epochs or 1)))
    sched = build_scheduler(opt, scheduler, total, per_epoch)
    return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}
