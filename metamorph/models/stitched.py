"""A stitched network: the first blocks of one block-sequence network, a stitch layer, the last
blocks of another (what Learngene Pool and SN-Net deploy).

:class:`StitchedNet` is a plain ``nn.Module`` with a JSON-serialisable :class:`StitchedArch`
(both members' family + arch, where the cut is, the stitch layer's kind and widths), registered
as the model family ``stitched``, so a chosen descendant is written and read back as a model file
(safetensors + JSON) and exported to ONNX like any other network. Members are rebuilt from their
own families and cut: the unused blocks are not kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from metamorph.models.blockseq import ResNetBlockSeq, as_block_seq
from metamorph.models.registry import build_from_arch, family_of, register_family


@dataclass
class StitchedArch:
    """``front[:front_blocks] -> stitch (kind, in_dim -> out_dim) -> back[back_start:]``."""

    front_family: str
    front_arch: dict
    front_blocks: int
    back_family: str
    back_arch: dict
    back_start: int
    stitch_kind: str = "conv1x1"
    stitch_in: int = 0
    stitch_out: int = 0
    meta: dict = field(default_factory=dict)

    # what the exporters and the data module read from ``model.arch``
    @property
    def num_classes(self) -> int:
        return int(self.back_arch["num_classes"])

    @property
    def in_channels(self) -> int:
        return int(self.front_arch.get("in_channels", 3))

    @property
    def mean(self) -> list[float]:
        return [float(v) for v in self.front_arch["mean"]]

    @property
    def std(self) -> list[float]:
        return [float(v) for v in self.front_arch["std"]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StitchedArch:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown StitchedArch fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**d)


def make_stitch(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """A stitch layer: 1x1 conv with bias on ``(B, C, H, W)`` or a linear map on ``(B, N, D)``.
    No normalisation after it, so a least-squares fit is exactly what the layer computes."""
    if kind == "conv1x1":
        return nn.Conv2d(in_dim, out_dim, 1, bias=True)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=True)
    raise ValueError(f"unknown stitch kind {kind!r}; choose conv1x1 or linear")


class StitchedNet(nn.Module):
    """``stem`` (front's) -> front blocks -> ``stitch`` -> back blocks -> ``head`` (back's)."""

    def __init__(self, arch: StitchedArch) -> None:
        super().__init__()
        self.arch = arch
        front = as_block_seq(build_from_arch(arch.front_family, arch.front_arch))
        back = as_block_seq(build_from_arch(arch.back_family, arch.back_arch))
        nf, nb = len(front.blocks), len(back.blocks)
        if not 1 <= arch.front_blocks <= nf or not 0 <= arch.back_start < nb:
            raise ValueError(
                f"stitched cut front_blocks={arch.front_blocks} (of {nf}), back_start="
                f"{arch.back_start} (of {nb}) keeps no block of one side"
            )
        self.stem = front.stem
        self.front = nn.ModuleList(list(front.blocks)[: arch.front_blocks])
        self.stitch = make_stitch(arch.stitch_kind, arch.stitch_in, arch.stitch_out)
        self.back = nn.ModuleList(list(back.blocks)[arch.back_start :])
        self.head = back.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for blk in self.front:
            h = blk(h)
        h = self.stitch(h)
        for blk in self.back:
            h = blk(h)
        return self.head(h)


def stitched_arch(
    front: nn.Module,
    front_blocks: int,
    back: nn.Module,
    back_start: int,
    kind: str,
    in_dim: int,
    out_dim: int,
    meta: dict | None = None,
) -> StitchedArch:
    """The arch of ``front[:front_blocks] -> stitch -> back[back_start:]`` for two plain
    networks of registered families (or ResNet block-sequence adapters)."""
    (ff, fa), (bf, ba) = family_arch(front), family_arch(back)
    return StitchedArch(
        ff,
        fa,
        int(front_blocks),
        bf,
        ba,
        int(back_start),
        kind,
        int(in_dim),
        int(out_dim),
        dict(meta or {}),
    )


def family_arch(net: nn.Module) -> tuple[str, dict]:
    """``(family name, arch dict)`` of a plain network or of a ResNet block-sequence adapter."""
    if isinstance(net, ResNetBlockSeq):
        return "cifar_resnet", net.arch.to_dict()
    fam = family_of(net)
    return fam.name, fam.arch_of(net)


register_family(
    "stitched", StitchedNet, lambda arch: StitchedNet(StitchedArch.from_dict(dict(arch)))
)
