"""Closed-form FLOPs of (compressed) CIFAR ResNets from their shapes alone.

Same convention as :func:`metamorph.utils.profile.count_flops` (``torch.utils.flop_counter``):
a multiply-add is 2 FLOPs, only convolutions and the classifier count (no bias, BN, ReLU,
shortcut or pooling terms). A convolution costs ``2 * C_in/groups * C_out * k_h * k_w * H_out *
W_out``; a :class:`~metamorph.search.lowrank.Tucker2Conv` costs its three convolutions (the
``1x1`` ``first`` at the input resolution, core and ``last`` at the output resolution).
"""

from __future__ import annotations

from torch import nn

from metamorph.models.resnet_cifar import ResNetArch
from metamorph.search.lowrank import RankPair, lowrank_layers


def out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def conv_flops(c_in: int, c_out: int, k: int, h_out: int, w_out: int) -> int:
    return 2 * c_in * c_out * k * k * h_out * w_out


def tucker2_flops(
    c_in: int,
    c_out: int,
    k: int,
    hw_in: tuple[int, int],
    hw_out: tuple[int, int],
    r_in: int | None,
    r_out: int | None,
) -> int:
    """FLOPs of a Tucker-2 layer (``None`` rank = that mode unfactored)."""
    total = 0
    core_in, core_out = c_in, c_out
    if r_in is not None:
        total += conv_flops(c_in, r_in, 1, *hw_in)
        core_in = r_in
    if r_out is not None:
        total += conv_flops(r_out, c_out, 1, *hw_out)
        core_out = r_out
    return total + conv_flops(core_in, core_out, k, *hw_out)


def resnet_layer_flops(
    arch: ResNetArch,
    lowrank: dict[str, RankPair] | None = None,
    input_size: tuple[int, int] = (32, 32),
) -> dict[str, int]:
    """FLOPs of every convolution and the classifier of ``CifarResNet(arch)`` whose convs named in
    ``lowrank`` are Tucker-2 layers at those ranks (per-block hidden widths from ``arch.hidden``)."""
    lowrank = lowrank or {}
    table: dict[str, int] = {}

    def conv(name: str, c_in: int, c_out: int, k: int, stride: int, pad: int, hw):
        ho, wo = out_size(hw[0], k, stride, pad), out_size(hw[1], k, stride, pad)
        if name in lowrank:
            r_in, r_out = lowrank[name]
            table[name] = tucker2_flops(c_in, c_out, k, hw, (ho, wo), r_in, r_out)
        else:
            table[name] = conv_flops(c_in, c_out, k, ho, wo)
        return ho, wo

    hw = conv("conv1", arch.in_channels, arch.stage_widths[0], 3, 1, 1, tuple(input_size))
    in_planes = arch.stage_widths[0]
    for s, (planes, hidden) in enumerate(zip(arch.stage_widths, arch.hidden)):
        for b, h in enumerate(hidden):
            p = f"layer{s + 1}.{b}"
            stride = 2 if (s > 0 and b == 0) else 1
            hw_in = hw
            hw = conv(f"{p}.conv1", in_planes, h, 3, stride, 1, hw_in)
            conv(f"{p}.conv2", h, planes, 3, 1, 1, hw)
            if arch.shortcut == "B" and (stride != 1 or in_planes != planes):
                conv(f"{p}.shortcut.0", in_planes, planes, 1, stride, 0, hw_in)
            in_planes = planes
    table["fc"] = 2 * in_planes * arch.num_classes
    return table


def resnet_flops(
    arch: ResNetArch,
    lowrank: dict[str, RankPair] | None = None,
    input_size: tuple[int, int] = (32, 32),
) -> int:
    """Total forward FLOPs of one image (see :func:`resnet_layer_flops`)."""
    return sum(resnet_layer_flops(arch, lowrank, input_size).values())


def model_flops(model: nn.Module, input_size: tuple[int, int] = (32, 32)) -> int:
    """Analytic FLOPs of a (possibly low-rank) ``CifarResNet`` instance from its shapes."""
    return resnet_flops(model.arch, lowrank_layers(model), input_size)
