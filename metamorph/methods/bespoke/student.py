"""A Bespoke student: the teacher with some segments replaced by alternatives.

Two views of the same network. :func:`chain` lists its units (teacher blocks and alternatives,
shared with the house, no copies) for the search's fast incremental evaluation from a cached
boundary activation; :func:`assemble` builds it as a plain :class:`CifarResNet` (every
alternative is a run of residual blocks, so per-stage depth and hidden widths just change; Tucker-2
convs make it a ``cifar_resnet_lowrank``), which model files, ONNX export and measurement take.
Its latency is declared as the sum of measured table entries: ``stem_head`` plus one entry per
unit (``block:<i>`` for a teacher block, ``alt:<id>`` for an alternative).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metamorph.models.resnet_cifar import BasicBlock, CifarResNet, ResNetArch
from metamorph.models.segments import set_submodule


@dataclass
class Unit:
    entry: str  # latency-table key: "block:<i>" or "alt:<id>"
    module: nn.Module
    teacher_start: int  # the teacher block index this unit starts at


def _check_disjoint(replaced: dict[tuple[int, int], object]) -> list[tuple[int, int]]:
    spans = sorted(replaced)
    for (a0, b0), (a1, b1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise ValueError(f"replacements [{a0},{b0}) and [{a1},{b1}) overlap")
    return spans


def chain(
    teacher: CifarResNet, replaced: dict[tuple[int, int], tuple[str, nn.Module]]
) -> list[Unit]:
    """The units of the student: ``replaced[(start, stop)] = (alt id, module)``."""
    blocks = teacher.blocks()
    starts = {a: (b, v) for (a, b), v in ((k, replaced[k]) for k in _check_disjoint(replaced))}
    units, i = [], 0
    while i < len(blocks):
        if i in starts:
            stop, (aid, mod) = starts[i]
            units.append(Unit(f"alt:{aid}", mod, i))
            i = stop
        else:
            units.append(Unit(f"block:{i}", blocks[i], i))
            i += 1
    return units


def run_from(teacher: CifarResNet, units: list[Unit], h: torch.Tensor, start: int) -> torch.Tensor:
    """Logits from the activation ``h`` at teacher block boundary ``start`` (a unit start)."""
    for u in units:
        if u.teacher_start >= start:
            h = u.module(h)
    return teacher.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def latency_entries(units: list[Unit]) -> list[str]:
    return ["stem_head", *[u.entry for u in units]]


def declared_latency(units: list[Unit], table: dict[str, float]) -> float:
    """The student's latency as the sum of its measured table entries (ms)."""
    missing = [e for e in latency_entries(units) if e not in table]
    if missing:
        raise KeyError(f"latency table lacks {missing[:3]}")
    return sum(table[e] for e in latency_entries(units))


@torch.no_grad()
def assemble(teacher: CifarResNet, units: list[Unit]) -> CifarResNet:
    """The student as a plain CIFAR ResNet (deep copies of every unit's blocks, stem and head)."""
    arch = copy.deepcopy(teacher.arch)
    stages: list[list[BasicBlock]] = [[] for _ in arch.hidden]
    bounds, acc = [], 0
    for h in arch.hidden:
        bounds.append((acc, acc + len(h)))
        acc += len(h)
    for u in units:
        s = next(k for k, (a, b) in enumerate(bounds) if a <= u.teacher_start < b)
        blocks = [u.module] if isinstance(u.module, BasicBlock) else list(u.module)
        stages[s].extend(blocks)
    for s, blks in enumerate(stages):
        if not blks:
            raise ValueError(f"stage {s + 1} of the student has no block")
    arch = ResNetArch.from_dict(
        {**arch.to_dict(), "hidden": [[b.conv1.out_channels for b in blks] for blks in stages]}
    )
    net = CifarResNet(arch)
    for name in ("conv1", "bn1", "fc"):
        set_submodule(net, name, copy.deepcopy(teacher.get_submodule(name)))
    for s, blks in enumerate(stages):
        for b, blk in enumerate(blks):
            set_submodule(net, f"layer{s + 1}.{b}", copy.deepcopy(blk))
    return net.eval()


class StemHead(nn.Module):
    """The teacher's stem and classifier head as one module (the ``stem_head`` latency entry);
    the pooled width is the last stage's."""

    def __init__(self, teacher: CifarResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.fc = teacher.conv1, teacher.bn1, teacher.fc
        self.last = teacher.arch.stage_widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        # the head reads a last-stage activation; a slice of the stem's stands in for its cost
        pooled = F.adaptive_avg_pool2d(h, 1).flatten(1)
        pooled = F.pad(pooled, (0, max(0, self.last - pooled.shape[1])))[:, : self.last]
        return self.fc(pooled)
