"""Shared tensors with their own optimizer: SGD groups inside AdamW (``task.shared_optim``)."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from metamorph.config.schema import OptimConfig, SchedulerConfig
from metamorph.tasks.optim import (
    AdamWWithSGDGroups,
    build_optimizer,
    build_scheduler,
    param_group,
)

SGD = OptimConfig(name="sgd", lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
ADAMW = OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-2)


def _params(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    a = [
        torch.randn(5, 3, generator=g).requires_grad_(),
        torch.randn(7, generator=g).requires_grad_(),
    ]
    b = [
        torch.randn(4, 4, generator=g).requires_grad_(),
        torch.randn(2, generator=g).requires_grad_(),
    ]
    return a, b


def _grads(params: list[torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _run(opt, params, steps: range) -> None:
    for s in steps:
        _grads(params, s)
        opt.step()


def test_each_group_follows_its_own_torch_optimizer():
    a, b = _params(0)
    mixed = build_optimizer([{"params": a}, param_group(b, SGD)], ADAMW)
    assert isinstance(mixed, AdamWWithSGDGroups)
    ra, rb = _params(0)
    ref_a = torch.optim.AdamW(ra, lr=1e-3, weight_decay=1e-2)
    ref_b = torch.optim.SGD(rb, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for s in range(6):
        _grads(a + b, s)
        _grads(ra + rb, s)
        mixed.step()
        ref_a.step()
        ref_b.step()
    for p, r in zip(a + b, ra + rb):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    # the SGD group really is SGD: its weights moved by far more than AdamW's lr would allow
    assert max((p - q).abs().max() for p, q in zip(b, _params(0)[1])) > 0.05


def test_state_dict_round_trip_resumes_exactly():
    a, b = _params(1)
    opt = build_optimizer([{"params": a}, param_group(b, SGD)], ADAMW)
    _run(opt, a + b, range(3))
    saved = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    assert saved["param_groups"][1]["algo"] == "sgd"
    snapshot = [p.detach().clone() for p in a + b]
    _run(opt, a + b, range(3, 6))

    a2, b2 = (
        [p.detach().clone().requires_grad_() for p in snapshot[:2]],
        [p.detach().clone().requires_grad_() for p in snapshot[2:]],
    )
    fresh = build_optimizer([{"params": a2}, param_group(b2, SGD)], ADAMW)
    fresh.load_state_dict(saved)
    _run(fresh, a2 + b2, range(3, 6))
    for p, q in zip(a + b, a2 + b2):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_onecycle_keeps_each_groups_peak():
    a, b = _params(2)
    opt = build_optimizer([{"params": a}, param_group(b, SGD)], ADAMW)
    sched = build_scheduler(opt, SchedulerConfig(name="onecycle", pct_start=0.5), 10, 5)[
        "scheduler"
    ]
    peaks = [0.0, 0.0]
    for s in range(10):
        _grads(a + b, s)
        opt.step()
        sched.step()
        peaks = [max(pk, g["lr"]) for pk, g in zip(peaks, opt.param_groups)]
    assert peaks[0] == pytest.approx(1e-3, rel=0.05) and peaks[1] == pytest.approx(0.02, rel=0.05)


def test_one_algorithm_builds_the_plain_torch_optimizer_with_group_settings():
    a, b = _params(3)
    opt = build_optimizer(
        [{"params": a}, param_group(b, OptimConfig(name="adamw", lr=5e-4))], ADAMW
    )
    assert type(opt) is torch.optim.AdamW
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-4]


def test_adamw_groups_inside_sgd_are_refused_with_the_fix():
    a, b = _params(4)
    with pytest.raises(ValueError, match="task.optim.name=adamw"):
        build_optimizer([{"params": a}, param_group(b, ADAMW)], SGD)
    with pytest.raises(ValueError, match="unknown optimizer"):
        param_group(b, OptimConfig(name="lion"))


def test_task_config_parses_shared_optim_and_rejects_typos():
    from metamorph.tasks.metamorph_train import metamorph_config

    base = OmegaConf.load("metamorph/conf/task/metamorph.yaml")
    hyper = OmegaConf.load("metamorph/conf/hypernet/default.yaml")
    cfg = OmegaConf.create({"task": base, "hypernet": hyper, "seed": 0})
    assert metamorph_config(cfg).shared_optim is None
    assert metamorph_config(cfg).ema_shared is False
    cfg.task.ema_shared = True
    assert metamorph_config(cfg).ema_shared is True
    cfg.task.prepare.bn_scal = "unit"  # a typo in task.prepare fails with the valid keys
    with pytest.raises(ValueError, match=r"task.prepare`: unknown keys \['bn_scal'\].*bn_scale"):
        metamorph_config(cfg)
    del cfg.task.prepare["bn_scal"]
    cfg.task.shared_optim = {"name": "sgd", "lr": 0.02, "nesterov": True}
    parsed = metamorph_config(cfg).shared_optim
    assert parsed == OptimConfig(name="sgd", lr=0.02, nesterov=True)
    assert metamorph_config(cfg).shared_optim_params == ["*"]
    cfg.task.shared_optim_params = ["*.bn*", "*.conv1.weight"]
    assert metamorph_config(cfg).shared_optim_params == ["*.bn*", "*.conv1.weight"]
    cfg.task.shared_optim = {"name": "sgd", "learning_rate": 0.02}
    with pytest.raises(ValueError, match="task.shared_optim"):
        metamorph_config(cfg)
