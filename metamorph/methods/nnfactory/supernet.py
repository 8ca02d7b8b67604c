"""NN-Factory's modular supernet over a CIFAR ResNet: modules that are switched on per task.

The paper's abstract fixes only "a modular supernet with pretrained modules that can be
conditionally activated"; what a module is was not recovered, so this follows the small-scale
design of the reference notes (docs/nnfactory-bespoke-reference.md, section 1.5) with two kinds:

- **width modules**: ``groups`` contiguous channel groups of each block's inner (hidden) conv.
  Switching one off zeroes its channels after ``bn1``; the residual tensor keeps its shape, so
  physical extraction only removes channels;
- **depth modules**: whole residual blocks, except the first block of every stage (it changes
  the resolution or width, or, in stage 1, keeps every stage at least one block deep): those
  keep at least their shortcut. Switching a block off leaves ``relu(x) = x`` (its input is
  already a ReLU output), i.e. the block is gone.

A mask is one 0/1 (or straight-through float) entry per module, in forward order: per block its
groups, then its block module where it has one. :meth:`ModularSupernet.extract` turns a hard
mask into a plain, physically smaller :class:`~metamorph.models.CifarResNet` whose outputs equal
the masked supernet's (a block with every group off keeps one hidden channel with a zeroed
``conv2`` column: the constant ``bn2`` shift the masked block still adds).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metamorph.models.resnet_cifar import CifarResNet, ResNetArch


@dataclass(frozen=True)
class Slot:
    """One switchable module: a channel group of ``block`` (``group`` >= 0) or the whole block
    (``group`` = -1)."""

    block: str
    group: int

    @property
    def name(self) -> str:
        return f"{self.block}.g{self.group}" if self.group >= 0 else f"{self.block}.block"


@dataclass(frozen=True)
class BlockLayout:
    name: str  # layer{s}.{b}
    stage: int  # 0-based
    index: int  # 0-based within the stage
    groups: tuple[tuple[int, ...], ...]  # hidden channel indices per group
    group_slots: tuple[int, ...]  # mask positions of the groups
    block_slot: int | None  # mask position of the block module (None: not skippable)


def channel_groups(width: int, groups: int) -> list[tuple[int, ...]]:
    """``width`` channels cut into ``groups`` contiguous groups of near-equal size."""
    return [tuple(int(c) for c in g) for g in np.array_split(np.arange(width), groups)]


class ModularSupernet(nn.Module):
    """A CIFAR ResNet whose channel groups and blocks are switched by a mask (see module doc)."""

    def __init__(self, net: CifarResNet, groups: int = 4) -> None:
        super().__init__()
        if not isinstance(net, CifarResNet):
            raise ValueError(
                f"the NN-Factory supernet is built over a CifarResNet; got {type(net).__name__}"
            )
        arch = net.arch
        odd = sorted(
            {
                arch.variant_of(f"layer{s + 1}.{b}")
                for s, st in enumerate(arch.hidden)
                for b in range(len(st))
            }
            - {"standard"}
        )
        if odd:
            raise ValueError(
                f"the supernet needs standard residual blocks; this network has {odd} blocks"
            )
        groups = int(groups)
        narrowest = min(min(st) for st in arch.hidden)
        if not 1 <= groups <= narrowest:
            raise ValueError(
                f"groups={groups}: each block's hidden width is cut into groups, so it must be "
                f"in 1..{narrowest} (the narrowest block)"
            )
        self.net = net
        self.groups = groups
        slots: list[Slot] = []
        layout: list[BlockLayout] = []
        for s, stage in enumerate(arch.hidden):
            for b, width in enumerate(stage):
                name = f"layer{s + 1}.{b}"
                gs = channel_groups(width, groups)
                first = len(slots)
                slots += [Slot(name, g) for g in range(groups)]
                block_slot = None
                if b > 0:
                    block_slot = len(slots)
                    slots.append(Slot(name, -1))
                layout.append(
                    BlockLayout(
                        name, s, b, tuple(gs), tuple(range(first, first + groups)), block_slot
                    )
                )
                # (groups, width) 0/1: expands a group mask to a channel mask
                assign = torch.zeros(groups, width)
                for g, chans in enumerate(gs):
                    assign[g, list(chans)] = 1.0
                self.register_buffer(f"_assign_{s}_{b}", assign, persistent=False)
        self.slots: list[Slot] = slots
        self.layout: list[BlockLayout] = layout

    @property
    def arch(self) -> ResNetArch:
        return self.net.arch

    @property
    def num_modules(self) -> int:
        return len(self.slots)

    def full_mask(self) -> torch.Tensor:
        return torch.ones(self.num_modules, device=self.net.fc.weight.device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``x`` with the modules of ``mask`` (``(num_modules,)``, 0/1 or
        straight-through floats) on; ``None``: the full network."""
        if mask is None:
            return self.net(x)
        if mask.shape != (self.num_modules,):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; this supernet has {self.num_modules} modules"
            )
        net = self.net
        out = F.relu(net.bn1(net.conv1(x)))
        mask = mask.to(out.dtype)
        for blk, lay in zip(net.blocks(), self.layout):
            sc = blk.shortcut(out)
            h = F.relu(blk.bn1(blk.conv1(out)))
            ch = mask[list(lay.group_slots)] @ getattr(self, f"_assign_{lay.stage}_{lay.index}")
            r = blk.bn2(blk.conv2(h * ch.view(1, -1, 1, 1)))
            if lay.block_slot is not None:
                r = r * mask[lay.block_slot]
            out = F.relu(r + sc)
        return net.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))

    # ------------------------------------------------------------------------------------------
    # Masks -> compact networks
    # ------------------------------------------------------------------------------------------

    def check_mask(self, mask) -> tuple[int, ...]:
        """A mask as a tuple of 0/1 ints, or a ``ValueError`` naming the bad entry."""
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().tolist()
        if not isinstance(mask, (list, tuple)):
            raise ValueError(
                f"a mask is a list of {self.num_modules} 0/1 entries (one per module); got {mask!r}"
            )
        if len(mask) != self.num_modules:
            raise ValueError(
                f"mask has {len(mask)} entries; the supernet has {self.num_modules} modules "
                f"({self.groups} groups per block + one per skippable block)"
            )
        out = []
        for i, v in enumerate(mask):
            if isinstance(v, bool) or v not in (0, 1):
                raise ValueError(
                    f"mask entry {i} ({self.slots[i].name}) is {v!r}; a mask holds 0 (off) or 1 (on)"
                )
            out.append(int(v))
        return tuple(out)

    def kept(self, mask) -> list[tuple[BlockLayout, list[int]]]:
        """Per block that stays, its kept hidden channels (empty: every group off)."""
        m = self.check_mask(mask)
        out = []
        for lay in self.layout:
            if lay.block_slot is not None and not m[lay.block_slot]:
                continue
            chans = [c for g, slot in enumerate(lay.group_slots) if m[slot] for c in lay.groups[g]]
            out.append((lay, chans))
        return out

    def arch_for(self, mask, classes: tuple[int, ...] | None = None) -> ResNetArch:
        """The architecture :meth:`extract` builds (no weights touched)."""
        arch = copy.deepcopy(self.arch)
        hidden: list[list[int]] = [[] for _ in arch.hidden]
        for lay, chans in self.kept(mask):
            hidden[lay.stage].append(max(1, len(chans)))
        arch.hidden = hidden
        arch.block_variants = {}
        arch.bn_blocks = []
        if classes is not None:
            arch.num_classes = len(classes)
        return arch

    @torch.no_grad()
    def extract(self, mask, classes: tuple[int, ...] | None = None) -> CifarResNet:
        """The masked network as a plain, physically smaller CifarResNet (skipped blocks gone,
        switched-off channels removed); ``classes``: keep only these classifier rows (a task
        model whose logits are the restricted ones, in this order)."""
        arch = self.arch_for(mask, classes)
        src = self.net.state_dict()
        state = {k: v.clone() for k, v in src.items() if not k.startswith("layer")}
        if classes is not None:
            rows = torch.as_tensor(list(classes), dtype=torch.long)
            state["fc.weight"] = state["fc.weight"][rows]
            state["fc.bias"] = state["fc.bias"][rows]
        position = [0] * len(arch.hidden)
        for lay, chans in self.kept(mask):
            j = position[lay.stage]
            position[lay.stage] += 1
            old, new = f"{lay.name}.", f"layer{lay.stage + 1}.{j}."
            idx = torch.as_tensor(chans or [0], dtype=torch.long)
            for k, v in src.items():
                if not k.startswith(old):
                    continue
                rest = k[len(old) :]
                if rest.startswith("conv1.") or (rest.startswith("bn1.") and v.dim() == 1):
                    v = v[idx]
                elif rest == "conv2.weight":
                    v = v[:, idx].clone()
                    if not chans:  # every group off: the channel is there but reads nothing
                        v.zero_()
                state[new + rest] = v.clone()
        model = CifarResNet(arch)
        model.load_state_dict(state)
        return model.to(self.net.fc.weight.device).eval()

    def describe(self, mask) -> dict:
        m = self.check_mask(mask)
        skipped = [
            lay.name for lay in self.layout if lay.block_slot is not None and not m[lay.block_slot]
        ]
        return {
            "modules": self.num_modules,
            "modules_on": int(sum(m)),
            "sparsity": round(1 - sum(m) / self.num_modules, 6),
            "hidden": self.arch_for(m).hidden,
            "skipped_blocks": skipped,
        }


def arch_costs(arch: ResNetArch, resolution: int = 32) -> dict[str, int]:
    """``{"params", "flops"}`` of a standard CIFAR ResNet computed from its shape alone: what
    :func:`metamorph.utils.profile.count_params` / ``count_flops`` (convolutions and the
    classifier, multiply-add = 2) report, without running a counter (a customization ranks
    dozens of assemblies in well under a second)."""
    bn = bool(arch.bn)
    params = flops = 0
    r = int(resolution)

    def conv(cin: int, cout: int, k: int, r_out: int, norm: bool = True) -> None:
        nonlocal params, flops
        params += cin * cout * k * k + (0 if bn else cout) + (2 * cout if bn and norm else 0)
        flops += 2 * cin * cout * k * k * r_out * r_out

    w0 = arch.stage_widths[0]
    conv(arch.in_channels, w0, 3, r)
    cin = w0
    for s, (planes, hidden) in enumerate(zip(arch.stage_widths, arch.hidden)):
        for b, h in enumerate(hidden):
            stride = 2 if (s > 0 and b == 0) else 1
            r = -(-r // stride)
            conv(cin, h, 3, r)
            conv(h, planes, 3, r)
            if not (stride == 1 and cin == planes) and arch.shortcut == "B":
                conv(cin, planes, 1, r)
            cin = planes
    params += cin * arch.num_classes + arch.num_classes
    flops += 2 * cin * arch.num_classes
    return {"params": int(params), "flops": int(flops)}


def random_mask(num_modules: int, sparsity: float, rng: np.random.Generator) -> tuple[int, ...]:
    """A uniformly random mask with exactly ``round(sparsity * num_modules)`` modules off."""
    n_off = int(round(float(sparsity) * num_modules))
    out = np.ones(num_modules, dtype=np.int64)
    out[rng.choice(num_modules, size=n_off, replace=False)] = 0
    return tuple(int(v) for v in out)
