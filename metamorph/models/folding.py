"""Folding BatchNorm into the preceding convolution (exact in eval mode)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new conv with bias computing ``bn(conv(x))`` using BN's running statistics."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every (conv, BN) pair listed by ``model.conv_bn_pairs()`` in place; BN -> Identity.

    Models that carry an ``arch`` with a ``bn`` flag get ``arch.bn = False`` so that the folded
    model is rebuilt correctly from its architecture file.
    """
    if not hasattr(model, "conv_bn_pairs"):
        raise TypeError(f"{type(model).__name__} does not list its conv_bn_pairs(); cannot fold")
    for conv_name, bn_name in model.conv_bn_pairs():
        bn = model.get_submodule(bn_name)
        if not isinstance(bn, nn.BatchNorm2d):
            continue  # already folded
        conv = model.get_submodule(conv_name)
        _set_submodule(model, conv_name, fold_conv_bn(conv, bn))
        _set_submodule(model, bn_name, nn.Identity())
    if hasattr(model, "arch") and hasattr(model.arch, "bn"):
        model.arch.bn = False
        if hasattr(model.arch, "bn_blocks"):
            model.arch.bn_blocks = []
    return model


@torch.no_grad()
def insert_batchnorm(
    model: nn.Module, blocks: list[str], images: torch.Tensor, scale: str = "identity"
) -> nn.Module:
    """A copy of the folded CIFAR ResNet ``model`` in which ``blocks`` keep a BatchNorm after each
    conv (``ResNetArch.bn_blocks``), initialised so that the network's function is unchanged in
    evaluation mode (and nearly so with batch statistics): the running statistics are the conv
    outputs' per-channel mean and variance on ``images`` (normalized), the affine parameters
    undo them. The inverse of folding, for the "keep BN" strategy.

    ``scale`` picks the conv weights' scale, which BN makes irrelevant to the function but not
    to training (a conv followed by BN is scale-invariant, so its effective learning rate goes
    as 1 / |W|^2): ``identity`` keeps the folded weights (whose per-channel scale carries the
    pretrained BN's gamma / sigma, 0.4x to 3x the pretrained weights' norm on ResNet-20);
    ``unit`` divides each output channel by its output's standard deviation, so every conv
    output starts at unit variance (close to the unfolded pretrained weights' scale)."""
    from metamorph.models.calibrate import channel_stats
    from metamorph.models.resnet_cifar import CifarResNet, ResNetArch

    if scale not in ("identity", "unit"):
        raise ValueError(f"prepare.bn_scale={scale!r}; choose identity or unit")
    if model.arch.bn:
        raise ValueError("insert_batchnorm needs a folded network (fold_batchnorm first)")
    stats = channel_stats(model, images)
    arch = ResNetArch.from_dict(model.arch.to_dict())
    arch.bn_blocks = sorted({*arch.bn_blocks, *blocks})
    new = CifarResNet(arch)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    kept = tuple(f"{b}.bn" for b in blocks)
    if unexpected or any(not m.startswith(kept) for m in missing):
        raise RuntimeError(f"insert_batchnorm mismatch: missing {missing}, unexpected {unexpected}")
    for b in blocks:
        for conv_name, bn_name in ((f"{b}.conv1", f"{b}.bn1"), (f"{b}.conv2", f"{b}.bn2")):
            st, bn = stats[conv_name], new.get_submodule(bn_name)
            std = st.std.double()
            # c: per-channel factor on the conv (1: identity; 1 / std: unit-variance outputs;
            # channels with a constant output keep their weights)
            c = (
                torch.ones_like(std)
                if scale == "identity"
                else torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.ones_like(std))
            )
            conv = new.get_submodule(conv_name)
            conv.weight.mul_(c.float().view(-1, 1, 1, 1))
            if conv.bias is not None:
                conv.bias.mul_(c.float())
            var = (std * c) ** 2
            bn.running_mean.copy_((st.mean.double() * c).float())
            bn.running_var.copy_(var.float())
            # weight * (c z - c mu) / sqrt(c^2 var + eps) + mu = z  (z: the folded conv's output)
            bn.weight.copy_(((var + bn.eps).sqrt() / c).float())
            bn.bias.copy_(st.mean)
            bn.num_batches_tracked.fill_(1)
    return new.eval()
