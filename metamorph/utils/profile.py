"""Model cost: parameters, FLOPs (torch.utils.flop_counter) and CPU latency (torch.utils.benchmark)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.benchmark import Timer
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


@torch.no_grad()
def cpu_latency_ms(
    model: nn.Module, batch_size: int = 1, threads: int | None = None, min_run_time: float = 0.5
) -> float:
    """Median forward latency in milliseconds on the CPU."""
    model = model.eval().to("cpu")
    x = torch.randn(batch_size, model.arch.in_channels if hasattr(model, "arch") else 3, 32, 32)
    model(x)
    t = Timer(
        "model(x)", globals={"model": model, "x": x}, num_threads=threads or torch.get_num_threads()
    )
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e3
