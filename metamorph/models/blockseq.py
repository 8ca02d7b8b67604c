"""The block-sequence protocol: a network seen as ``stem -> blocks -> head``.

Learngene Pool, its stitch layers and SN-Net cut networks between blocks and join pieces of
different networks, so they need one view of every family (CIFAR ResNets here, the small ViT in
:mod:`metamorph.models.vit`). A block-sequence network is an ``nn.Module`` with

- ``stem``: image ``(B, 3, H, W)`` -> input of block 0;
- ``blocks``: ``nn.ModuleList``, block ``i`` maps features to features;
- ``head``: output of the last block -> logits ``(B, num_classes)``;
- ``block_dims``: feature width of each block's *output* (channels / embedding dim);
- ``block_stages``: resolution stage of each block's output (ResNet 0, 1, 2 by stride; ViT all 0);
- ``stitch_kind``: ``"conv1x1"`` (features ``(B, C, H, W)``) or ``"linear"`` (``(B, N, D)``);
- ``forward(x) == head(blocks[-1](... blocks[0](stem(x))))``.

A stitch from the output of block ``i`` of A into block ``j`` of B needs
``A.block_stages[i] == input_stage(B, j)`` (same spatial / token layout); its widths are
``A.block_dims[i] -> input_dim(B, j)``. The stitch layers themselves live with Learngene Pool
(``metamorph.methods.learngene.stitch``): this module only describes and runs networks.

CIFAR ResNets get an adapter, :class:`ResNetBlockSeq`, that *shares* the modules of a
:class:`~metamorph.models.resnet_cifar.CifarResNet` (no copy), so training the adapter trains the
ResNet and the adapter's forward equals the ResNet's.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from metamorph.models.resnet_cifar import CifarResNet

STITCH_KINDS = ("conv1x1", "linear")


@runtime_checkable
class BlockSeq(Protocol):
    """What a block-sequence network provides (see the module docstring)."""

    stem: nn.Module
    blocks: nn.ModuleList
    head: nn.Module
    block_dims: list[int]
    block_stages: list[int]
    stitch_kind: str


class ResNetStem(nn.Module):
    """``relu(bn1(conv1(x)))`` of a CIFAR ResNet (the modules are shared, not copied)."""

    def __init__(self, conv1: nn.Module, bn1: nn.Module) -> None:
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class ResNetHead(nn.Module):
    """Global average pool then the classifier of a CIFAR ResNet."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class ResNetBlockSeq(nn.Module):
    """A :class:`CifarResNet` as a block sequence; every block is one BasicBlock.

    The parameters are the ResNet's own (shared modules), so the state dict uses the names
    ``stem.conv1``, ``blocks.{i}.conv1``, ``head.fc`` ...; :meth:`resnet_state_dict` maps them back
    to the ResNet's names (``conv1``, ``layer{s}.{b}.conv1``, ``fc``).
    """

    stitch_kind = "conv1x1"

    def __init__(self, net: CifarResNet) -> None:
        super().__init__()
        if not isinstance(net, CifarResNet):
            raise TypeError(f"ResNetBlockSeq wraps a CifarResNet, got {type(net).__name__}")
        self.arch = net.arch
        self.stem = ResNetStem(net.conv1, net.bn1)
        self.blocks = nn.ModuleList(net.blocks())
        self.head = ResNetHead(net.fc)
        self.stem_dim = int(net.arch.stage_widths[0])
        self.block_dims = [
            int(w) for w, stage in zip(net.arch.stage_widths, net.arch.hidden) for _ in stage
        ]
        self.block_stages = [s for s, stage in enumerate(net.arch.hidden) for _ in stage]
        # block i's name in the ResNet (layer{s}.{b}), for mapping parameters back
        self.block_names = [
            f"layer{s + 1}.{b}"
            for s, stage in enumerate(net.arch.hidden)
            for b in range(len(stage))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self, x)

    def to_resnet(self) -> CifarResNet:
        """A fresh :class:`CifarResNet` with this adapter's current weights."""
        net = CifarResNet(self.arch)
        net.load_state_dict(self.resnet_state_dict())
        return net

    def resnet_state_dict(self) -> dict[str, torch.Tensor]:
        """This adapter's state dict under the ResNet's parameter names."""
        out: dict[str, torch.Tensor] = {}
        for key, value in self.state_dict().items():
            if key.startswith("stem."):
                out[key.removeprefix("stem.")] = value
            elif key.startswith("head."):
                out[key.removeprefix("head.")] = value
            else:
                _, idx, rest = key.split(".", 2)
                out[f"{self.block_names[int(idx)]}.{rest}"] = value
        return out


def as_block_seq(net: nn.Module) -> nn.Module:
    """``net`` itself if it follows the protocol, a :class:`ResNetBlockSeq` for a CifarResNet."""
    if isinstance(net, CifarResNet):
        return ResNetBlockSeq(net)
    check_block_seq(net)
    return net


def check_block_seq(net: nn.Module) -> None:
    """Raise a ``TypeError`` / ``ValueError`` naming what ``net`` lacks for the protocol."""
    missing = [
        a
        for a in ("stem", "blocks", "head", "block_dims", "block_stages", "stitch_kind")
        if not hasattr(net, a)
    ]
    if missing:
        raise TypeError(
            f"{type(net).__name__} is not a block-sequence network: it lacks {missing} "
            "(see metamorph.models.blockseq; wrap a CifarResNet with as_block_seq)"
        )
    n = len(net.blocks)
    if n == 0:
        raise ValueError(f"{type(net).__name__} has no blocks")
    if len(net.block_dims) != n or len(net.block_stages) != n:
        raise ValueError(
            f"{type(net).__name__} has {n} blocks but {len(net.block_dims)} block_dims and "
            f"{len(net.block_stages)} block_stages; give one per block"
        )
    if net.stitch_kind not in STITCH_KINDS:
        raise ValueError(f"stitch_kind {net.stitch_kind!r} is not one of {STITCH_KINDS}")


def run_blocks(
    net: nn.Module, x: torch.Tensor, start: int | None = None, stop: int | None = None
) -> torch.Tensor:
    """Run blocks ``start..stop-1`` of ``net`` (the convention of ``CifarResNet.forward``):
    ``start=None`` takes the image (applies the stem), ``start=k`` takes ``x`` as the input of
    block ``k``; ``stop=None`` ends with the head (logits), ``stop=k`` returns the input of block
    ``k`` (the output of block ``k - 1``), so ``run_blocks(n, run_blocks(n, x, stop=k), start=k)``
    equals ``n(x)``."""
    n = len(net.blocks)
    first = 0 if start is None else int(start)
    last = n if stop is None else int(stop)
    if not 0 <= first <= last <= n:
        raise ValueError(f"block range [{start}, {stop}) is outside this network's {n} blocks")
    h = net.stem(x) if start is None else x
    for blk in list(net.blocks)[first:last]:
        h = blk(h)
    return net.head(h) if stop is None else h


def block_outputs(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The output of every block and the logits, in one pass."""
    h = net.stem(x)
    outs = []
    for blk in net.blocks:
        h = blk(h)
        outs.append(h)
    return outs, net.head(h)


def input_stage(net: nn.Module, j: int) -> int:
    """Resolution stage of block ``j``'s input (the stem's output is stage 0)."""
    return 0 if j == 0 else int(net.block_stages[j - 1])


def input_dim(net: nn.Module, j: int) -> int:
    """Feature width of block ``j``'s input (block 0 needs the network's ``stem_dim``)."""
    if j > 0:
        return int(net.block_dims[j - 1])
    if not hasattr(net, "stem_dim"):
        raise ValueError(f"{type(net).__name__} declares no stem_dim; stitch into a block j >= 1")
    return int(net.stem_dim)


def can_stitch(front: nn.Module, i: int, back: nn.Module, j: int) -> bool:
    """Whether block ``i``'s output of ``front`` can feed block ``j`` of ``back`` through a stitch
    layer (same stage layout and same stitch kind)."""
    return front.stitch_kind == back.stitch_kind and int(front.block_stages[i]) == input_stage(
        back, j
    )
