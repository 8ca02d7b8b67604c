"""Model cost: parameters, FLOPs (torch.utils.flop_counter) and a CPU-latency shortcut onto
:mod:`metamorph.devices` (where every latency is measured)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_shape=(1, 3, 32, 32)) -> int:
    """Forward FLOPs (multiply-add = 2 FLOPs) of one pass at ``input_shape``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as fc:
        model(torch.zeros(input_shape, device=device))
    model.train(was_training)
    return int(fc.get_total_flops())


def cpu_latency_ms(
    model: nn.Module, batch_size: int = 1, threads: int | None = None, min_run_time: float = 0.5
) -> float:
    """Median forward latency in milliseconds on the CPU (eager PyTorch): a shortcut for
    :func:`metamorph.devices.time_module` on an ad-hoc ``torch_cpu`` profile (the shipped
    profiles, e.g. ``cpu1_b1``, and :func:`metamorph.devices.measure_model` give IQR, memory and
    the machine too)."""
    from metamorph.devices import DeviceProfile, time_module

    threads = int(threads or torch.get_num_threads())
    p = DeviceProfile(
        name=f"torch_cpu{threads}_b{batch_size}",
        threads=threads,
        batch_size=int(batch_size),
        warmup=1,
        min_run_time=float(min_run_time),
    )
    in_ch = model.arch.in_channels if hasattr(model, "arch") else 3
    return time_module(model, torch.randn(batch_size, in_ch, 32, 32), p).median_ms
