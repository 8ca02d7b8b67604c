"""Depthwise-separable CIFAR ResNets: model family ``cifar_resnet_dwsep``.

A network some of whose 3x3 convolutions were replaced by :class:`DWSepConv` (Bespoke's LANA-style
baseline builds them, :mod:`metamorph.methods.bespoke.lana`). It lives with the other model
families so that a model file of one loads anywhere (``metamorph-profile``, ``metamorph.load``)
without importing the method that made it: its ``ResNetArch`` plus the list of replaced convs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from metamorph.models.registry import register_family
from metamorph.models.resnet_cifar import BasicBlock, CifarResNet, ResNetArch
from metamorph.models.segments import set_submodule

DWSEP_FAMILY = "cifar_resnet_dwsep"


class DWSepConv(nn.Module):
    """A depthwise ``k x k`` convolution (``groups = C_in``, carrying the stride and padding)
    followed by a pointwise ``1 x 1`` convolution ``C_in -> C_out`` (with the bias, if any)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, kernel_size, stride, padding, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    @classmethod
    def like(cls, conv: nn.Conv2d) -> DWSepConv:
        if conv.groups != 1 or conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError(f"cannot make a depthwise-separable copy of {conv}")
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            conv.stride,
            conv.padding,
            conv.bias is not None,
        )

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d) -> DWSepConv:
        """The closest depthwise-separable factorisation of ``conv`` (Frobenius): for each input
        channel ``i``, the ``(C_out, k*k)`` slice ``W[:, i]`` is replaced by its best rank-1
        approximation ``p_i d_i^T`` (``d_i``: the depthwise filter, ``p_i``: the pointwise
        column)."""
        m = cls.like(conv)
        w = conv.weight.detach().double()  # (C_out, C_in, k, k)
        c_out, c_in, k, _ = w.shape
        slices = w.permute(1, 0, 2, 3).reshape(c_in, c_out, k * k)
        u, s, vh = torch.linalg.svd(slices, full_matrices=False)
        m.depthwise.weight.copy_(vh[:, 0, :].reshape(c_in, 1, k, k).float())
        m.pointwise.weight.copy_((u[:, :, 0] * s[:, :1]).T.reshape(c_out, c_in, 1, 1).float())
        if conv.bias is not None:
            m.pointwise.bias.copy_(conv.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def dwsep_block(block: BasicBlock) -> BasicBlock:
    """A copy of ``block`` whose two 3x3 convolutions are depthwise-separable (initialised from
    them by :meth:`DWSepConv.from_conv`; BN, shortcut and widths unchanged)."""
    new = copy.deepcopy(block)
    for name in ("conv1", "conv2"):
        conv = getattr(block, name)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"block {name} is a {type(conv).__name__}, not a Conv2d")
        setattr(new, name, DWSepConv.from_conv(conv))
    return new


def dwsep_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, DWSepConv)]


def build_dwsep(arch: dict) -> CifarResNet:
    """Rebuild a ``cifar_resnet_dwsep`` network from its architecture dict (weights uninitialised)."""
    arch = dict(arch)
    names = arch.pop("dwsep", []) or []
    net = CifarResNet(ResNetArch.from_dict(arch))
    for name in names:
        set_submodule(net, name, DWSepConv.like(net.get_submodule(name)))
    return net


def dwsep_arch(model: nn.Module) -> dict:
    from metamorph.models.lowrank import lowrank_layers

    if lowrank_layers(model):
        raise ValueError(
            "a network with both depthwise-separable and Tucker-2 layers has no model family; "
            "build LANA houses without the lowrank kind"
        )
    return {**model.arch.to_dict(), "dwsep": dwsep_layers(model)}


register_family(
    DWSEP_FAMILY,
    CifarResNet,
    build_dwsep,
    arch_of=dwsep_arch,
    matches=lambda m: bool(dwsep_layers(m)),
)
