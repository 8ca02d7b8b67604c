"""CIFAR ResNets of depth 6n+2 (He et al. 2016) with per-block hidden widths and per-stage depth.

The architecture is fully described by :class:`ResNetArch`, a JSON-serialisable dataclass, so any
shape a metamorphic network emits can be rebuilt as a plain ``nn.Module`` without an INR.

Parameter names follow one convention everywhere in metamorph::

    conv1, bn1                               stem
    layer{s}.{b}.conv1 / bn1 / conv2 / bn2   BasicBlock b of stage s (1-based stage, 0-based block)
    layer{s}.{b}.shortcut.0 / .1             option-B projection (1x1 conv + BN)
    layer{s}.{b}.alpha / .shortcut_scale     block-variant scalars
    fc                                       classifier
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from metamorph.models.registry import register_family, register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SHORTCUTS = ("A", "B")
BLOCK_VARIANTS = ("standard", "skipinit", "scaled_shortcut", "learnable_shortcut")


@dataclass
class ResNetArch:
    """Everything needed to rebuild a CIFAR ResNet.

    ``hidden[s][b]`` is the hidden width (conv1 out = conv2 in) of block ``b`` of stage ``s``;
    ``len(hidden[s])`` is that stage's depth. ``bn=False`` means BatchNorm has been folded into
    the convolutions (which then carry biases).
    """

    stage_widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    hidden: list[list[int]] = field(default_factory=lambda: [[16] * 3, [32] * 3, [64] * 3])
    num_classes: int = 10
    in_channels: int = 3
    shortcut: str = "A"
    bn: bool = True
    block_variant: str = "standard"
    # per-block overrides of ``block_variant``, e.g. {"layer3.1": "skipinit"} (the seed paper
    # replaces BN only in the metamorphic blocks)
    block_variants: dict[str, str] = field(default_factory=dict)
    # blocks that keep a BatchNorm after each (folded, biased) conv although ``bn`` is False:
    # the seed paper's "keep BN in metamorphic blocks" strategy
    bn_blocks: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=lambda: list(CIFAR10_MEAN))
    std: list[float] = field(default_factory=lambda: list(CIFAR10_STD))

    def __post_init__(self) -> None:
        self.stage_widths = [int(w) for w in self.stage_widths]
        self.hidden = [[int(h) for h in stage] for stage in self.hidden]
        self.mean = [float(m) for m in self.mean]
        self.std = [float(s) for s in self.std]
        if len(self.stage_widths) != len(self.hidden):
            raise ValueError(
                f"stage_widths has {len(self.stage_widths)} stages but hidden has {len(self.hidden)}"
            )
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {self.shortcut!r}; choose one of {SHORTCUTS}")
        if self.block_variant not in BLOCK_VARIANTS:
            raise ValueError(
                f"unknown block_variant {self.block_variant!r}; choose one of {BLOCK_VARIANTS}"
            )
        self.block_variants = {str(k): str(v) for k, v in dict(self.block_variants).items()}
        self.bn_blocks = [str(b) for b in self.bn_blocks]
        for name, v in self.block_variants.items():
            if v not in BLOCK_VARIANTS:
                raise ValueError(
                    f"unknown block variant {v!r} for {name}; choose one of {BLOCK_VARIANTS}"
                )
        for name in [*self.block_variants, *self.bn_blocks]:
            parts = name.removeprefix("layer").split(".")
            if (
                not name.startswith("layer")
                or len(parts) != 2
                or not all(p.isdigit() for p in parts)
            ):
                raise ValueError(
                    f"block_variants key / bn_blocks entry {name!r} is not a block name like "
                    "'layer3.1'"
                )
            if not 1 <= int(parts[0]) <= len(self.hidden):
                raise ValueError(
                    f"block_variants / bn_blocks names {name}, but there are {len(self.hidden)} stages"
                )
        for s, stage in enumerate(self.hidden):
            if len(stage) < 1:
                raise ValueError(f"stage {s + 1} has no blocks; every stage needs at least 1")
            for b, h in enumerate(stage):
                if h < 1:
                    raise ValueError(f"hidden width of layer{s + 1}.{b} is {h}; it must be >= 1")
        if any(w < 1 for w in self.stage_widths):
            raise ValueError(f"stage widths must be >= 1, got {self.stage_widths}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per input channel")

    def variant_of(self, name: str) -> str:
        """The block variant of block ``name`` (``"layer2.0"``)."""
        return self.block_variants.get(name, self.block_variant)

    @property
    def depth(self) -> int:
        return 2 + 2 * sum(len(s) for s in self.hidden)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ResNetArch:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ResNetArch fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


class ShortcutA(nn.Module):
    """Parameter-free shortcut: spatial subsampling plus zero channel padding (option A)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        if extra < 0:
            raise ValueError(
                f"option-A shortcut cannot shrink channels ({in_planes} -> {planes}); use shortcut B"
            )
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


def _norm(channels: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU; hidden width free.

    Variants (the BN-replacement strategies of Sommariva et al.):
    ``skipinit``: residual branch times a learnable ``alpha`` (init 0);
    ``scaled_shortcut``: ``(F(x) + x) * sqrt(0.5)``;
    ``learnable_shortcut``: ``(F(x) + s * x) * sqrt(0.5)`` with learnable ``s`` (init 1).
    """

    def __init__(
        self,
        in_planes: int,
        hidden: int,
        planes: int,
        stride: int = 1,
        shortcut: str = "A",
        bn: bool = True,
        variant: str = "standard",
        keep_bn: bool = False,
    ) -> None:
        super().__init__()
        self.variant = variant
        # keep_bn: BatchNorm after folded (biased) convolutions in an otherwise folded network
        self.conv1 = nn.Conv2d(in_planes, hidden, 3, stride, 1, bias=not bn)
        self.bn1 = _norm(hidden, bn or keep_bn)
        self.conv2 = nn.Conv2d(hidden, planes, 3, 1, 1, bias=not bn)
        self.bn2 = _norm(planes, bn or keep_bn)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=not bn), _norm(planes, bn)
            )
        if variant == "skipinit":
            self.alpha = nn.Parameter(torch.zeros(()))
        elif variant == "learnable_shortcut":
            self.shortcut_scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = self.shortcut(x)
        if self.variant == "skipinit":
            out = out * self.alpha + sc
        elif self.variant == "scaled_shortcut":
            out = (out + sc) * math.sqrt(0.5)
        elif self.variant == "learnable_shortcut":
            out = (out + self.shortcut_scale * sc) * math.sqrt(0.5)
        else:
            out = out + sc
        return F.relu(out)


class CifarResNet(nn.Module):
    """A CIFAR ResNet built from a :class:`ResNetArch`."""

    def __init__(self, arch: ResNetArch) -> None:
        super().__init__()
        self.arch = arch
        w0 = arch.stage_widths[0]
        self.conv1 = nn.Conv2d(arch.in_channels, w0, 3, 1, 1, bias=not arch.bn)
        self.bn1 = _norm(w0, arch.bn)
        in_planes = w0
        for s, (planes, hidden) in enumerate(zip(arch.stage_widths, arch.hidden)):
            blocks = []
            for b, h in enumerate(hidden):
                stride = 2 if (s > 0 and b == 0) else 1
                name = f"layer{s + 1}.{b}"
                blocks.append(
                    BasicBlock(
                        in_planes,
                        h,
                        planes,
                        stride,
                        arch.shortcut,
                        arch.bn,
                        arch.variant_of(name),
                        keep_bn=name in arch.bn_blocks,
                    )
                )
                in_planes = planes
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(in_planes, arch.num_classes)
        self._init_weights()

    @property
    def num_stages(self) -> int:
        return len(self.arch.stage_widths)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{s + 1}") for s in range(self.num_stages)]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """(conv, bn) module names whose BN directly follows the conv (for folding)."""
        pairs = [("conv1", "bn1")]
        for s, stage in enumerate(self.stages()):
            for b, block in enumerate(stage):
                p = f"layer{s + 1}.{b}"
                pairs += [(f"{p}.conv1", f"{p}.bn1"), (f"{p}.conv2", f"{p}.bn2")]
                if isinstance(block.shortcut, nn.Sequential):
                    pairs.append((f"{p}.shortcut.0", f"{p}.shortcut.1"))
        return pairs

    def blocks(self) -> list[BasicBlock]:
        """Every BasicBlock in forward order (stage by stage)."""
        return [blk for stage in self.stages() for blk in stage]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (the classifier's input)."""
        return F.adaptive_avg_pool2d(self(x, stop=len(self.blocks())), 1).flatten(1)

    def forward(
        self, x: torch.Tensor, start: int | None = None, stop: int | None = None
    ) -> torch.Tensor:
        """Logits of images ``x``; or a slice of the network by block index (forward order):
        ``stop=k`` returns the activation after the stem and the first k blocks, ``start=k`` takes
        that activation as ``x`` and finishes the network, so
        ``net(net(x, stop=k), start=k) == net(x)`` (used to share a frozen prefix)."""
        blocks = self.blocks()
        first = 0 if start is None else int(start)
        last = len(blocks) if stop is None else int(stop)
        if not 0 <= first <= last <= len(blocks):
            raise ValueError(
                f"block slice [{start}, {stop}) is outside this network's {len(blocks)} blocks"
            )
        out = F.relu(self.bn1(self.conv1(x))) if start is None else x
        for blk in blocks[first:last]:
            out = blk(out)
        if stop is not None:
            return out
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def cifar_resnet_arch(
    depth: int = 20,
    num_classes: int = 10,
    stage_widths: list[int] | tuple[int, ...] = (16, 32, 64),
    hidden: list[list[int]] | None = None,
    hidden_width: int | list[int] | None = None,
    blocks_per_stage: int | list[int] | None = None,
    shortcut: str = "A",
    bn: bool = True,
    block_variant: str = "standard",
    mean: tuple[float, ...] | list[float] = CIFAR10_MEAN,
    std: tuple[float, ...] | list[float] = CIFAR10_STD,
) -> ResNetArch:
    """Build a :class:`ResNetArch` for depth 6n+2.

    ``hidden`` gives every block's hidden width explicitly; otherwise ``hidden_width`` (one int
    for all blocks or one per stage) or, by default, the stage width. ``blocks_per_stage``
    overrides n (per stage or for all).
    """
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110); got {depth}"
        )
    n = (depth - 2) // 6
    stage_widths = [int(w) for w in stage_widths]
    num_stages = len(stage_widths)
    if hidden is None:
        if blocks_per_stage is None:
            counts = [n] * num_stages
        elif isinstance(blocks_per_stage, int):
            counts = [blocks_per_stage] * num_stages
        else:
            counts = list(blocks_per_stage)
        if hidden_width is None:
            per_stage = stage_widths
        elif isinstance(hidden_width, int):
            per_stage = [hidden_width] * num_stages
        else:
            per_stage = list(hidden_width)
        for what, values in (("blocks_per_stage", counts), ("hidden_width", per_stage)):
            if len(values) != num_stages:
                raise ValueError(
                    f"{what} has {len(values)} entries but there are {num_stages} stages "
                    f"(stage_widths={stage_widths}); give one value per stage or a single int"
                )
        hidden = [[per_stage[s]] * counts[s] for s in range(num_stages)]
    return ResNetArch(
        stage_widths=stage_widths,
        hidden=[list(h) for h in hidden],
        num_classes=num_classes,
        shortcut=shortcut,
        bn=bn,
        block_variant=block_variant,
        mean=list(mean),
        std=list(std),
    )


register_family(
    "cifar_resnet", CifarResNet, lambda arch: CifarResNet(ResNetArch.from_dict(dict(arch)))
)


def _make_resnet(depth: int) -> Callable[..., nn.Module]:
    def builder(**kwargs) -> nn.Module:
        return CifarResNet(cifar_resnet_arch(depth=depth, **kwargs))

    builder.__name__ = f"resnet{depth}"
    builder.__doc__ = f"CIFAR ResNet-{depth} ({(depth - 2) // 6} BasicBlocks per stage)."
    return builder


for _depth in (20, 32, 44, 56, 110):
    register_model(_make_resnet(_depth))
