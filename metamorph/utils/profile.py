"""Model cost: parameters and FLOPs (torch.utils.flop_counter). Latency is measured by
:mod:`metamorph.devices` (``measure_model``, ``cpu_latency_ms``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the CPU one, so a ViT would lose its attention
# FLOPs on CPU only: the same formula for the CPU kernel keeps counts device-independent
_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_shape=(1, 3, 32, 32)) -> int:
    """Forward FLOPs (multiply-add = 2 FLOPs) of one pass at ``input_shape``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as fc:
        model(torch.zeros(input_shape, device=device))
    model.train(was_training)
    return int(fc.get_total_flops())
