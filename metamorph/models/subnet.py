"""Sub-network families: one protocol for every trained artefact that yields many networks.

A *family* is a space of *descriptors* (hashable, JSON-serialisable values naming one member: the
per-block hidden widths and stage depths of a metamorphic or slimmable network, GeneCAI's
per-layer ranks or prune rates; next NN-Factory masks, Bespoke hybrids, Learngene descendants)
with a small verb set, in the spirit of Once-for-All's ``sample_active_subnet`` /
``get_active_subnet``:

``validate(desc)``
    the canonical descriptor, or a ``ValueError`` naming the bad entry and the valid choices;
``materialize(desc)``
    a plain deployable ``nn.Module`` (no INR, no slicing, no masks);
``forward_at(x, desc)``
    the family's own forward at ``desc`` (what ``materialize(desc)(x)`` must equal);
``arch_for(desc)``, ``describe(desc)`` (readable, JSON), ``costs(desc)`` (``params``, ``flops``);
``full()``, ``for_ratio(gamma)`` (where a uniform ratio means something), ``sample(rng)``
    ways to enumerate members.

Sweeps, sampling, budget selection and search are written against these verbs, so they work on
any family. :class:`ResNetWidths` implements them once for descriptors that are CIFAR ResNet
``hidden`` shapes (:func:`check_hidden` is the one shape check of metamorph); a family only says
which blocks vary and over which range. Families register with :func:`register_subnet_family`,
and the protocol tests run over every registered family (each gives a tiny :meth:`example`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from metamorph.models.resnet_cifar import CifarResNet, ResNetArch

Hidden = tuple[tuple[int, ...], ...]

_SUBNET_FAMILIES: dict[str, type] = {}


def register_subnet_family(cls: type) -> type:
    """Class decorator: register a sub-network family under ``cls.family_name``."""
    name = getattr(cls, "family_name", None)
    if not name:
        raise ValueError(f"{cls.__name__} needs a family_name to be registered")
    if name in _SUBNET_FAMILIES and _SUBNET_FAMILIES[name] is not cls:
        raise ValueError(f"sub-network family {name!r} is already registered")
    _SUBNET_FAMILIES[name] = cls
    return cls


def subnet_families() -> dict[str, type]:
    """Every registered sub-network family class by name (for protocol tests and tools)."""
    return dict(sorted(_SUBNET_FAMILIES.items()))


class SubnetFamily:
    """The protocol (see the module docstring). Subclasses implement ``validate``,
    ``materialize``, ``arch_for``, ``describe``, ``full`` and ``sample``; the defaults below
    derive the rest from them."""

    family_name: str = ""

    def validate(self, desc):
        raise NotImplementedError

    def materialize(self, desc) -> nn.Module:
        raise NotImplementedError

    def arch_for(self, desc):
        raise NotImplementedError

    def describe(self, desc) -> dict:
        raise NotImplementedError

    def full(self):
        raise NotImplementedError

    def sample(self, rng: np.random.Generator):
        raise NotImplementedError

    def for_ratio(self, gamma: float):
        raise ValueError(
            f"the {self.family_name} family has no uniform compression ratio; enumerate it with "
            "full() or sample(rng), or give a descriptor"
        )

    def forward_at(self, x: torch.Tensor, desc) -> torch.Tensor:
        """Logits of the member ``desc`` (default: of its materialized network)."""
        net = self.materialize(desc)
        return net.to(x.device)(x)

    def forward_fn(self, desc):
        """``x -> logits`` of the member ``desc``, prepared once for many batches (weights
        emitted, sliced or built once): what sweeps and searches call per batch."""
        return self.materialize(desc).eval()

    def prepare(self, descs, recalibrate: bool = False) -> None:
        """Compute what members need before they are evaluated (a slimmable network's BN
        statistics per width); nothing by default. ``recalibrate`` redoes stored ones."""

    def trained_gamma_range(self) -> tuple[float, float] | None:
        """The compression ratios seen in training (``None``: not a trained range)."""
        return None

    def cost_module(self, desc) -> nn.Module:
        """A parameter-less (meta-device) module with the member's structure, for counting."""
        with torch.device("meta"):
            return self.materialize(desc)

    def costs(self, desc, input_size: tuple[int, int] = (32, 32)) -> dict[str, int]:
        """``{"params", "flops"}`` of the member (FLOPs of one image, multiply-add = 2)."""
        from metamorph.utils.profile import count_flops, count_params

        mod = self.cost_module(self.validate(desc))
        c = getattr(getattr(mod, "arch", None), "in_channels", 3)
        return {"params": count_params(mod), "flops": count_flops(mod, (1, c, *input_size))}

    def is_seen(self, desc) -> bool:
        """Whether ``desc`` was trained (every member of a fixed space is)."""
        return True

    def gamma_of(self, desc) -> float:
        """Mean compression ratio of the member (0 for the full one)."""
        return 0.0

    @classmethod
    def example(cls) -> SubnetFamily:
        """A tiny instance for the protocol tests (random weights, CPU, seconds to build)."""
        raise NotImplementedError(f"{cls.__name__} gives no example for the protocol tests")


# ------------------------------------------------------------------------------------------
# CIFAR ResNet hidden shapes
# ------------------------------------------------------------------------------------------


def as_hidden(desc, prefix: str = "shape ") -> Hidden:
    """A ``hidden`` descriptor (list/tuple of per-stage lists of integer widths) as tuples;
    ``prefix`` starts the error message (``"hidden="`` names a config key)."""
    ok = isinstance(desc, (list, tuple)) and all(isinstance(s, (list, tuple)) for s in desc)
    if not ok:
        raise ValueError(
            f"{prefix}{desc!r} must be a list of lists of widths, one list per stage, "
            "e.g. [[16,16,16],[32,32,32],[64,64,32]]"
        )
    out = []
    for s, stage in enumerate(desc):
        row = []
        for b, w in enumerate(stage):
            if isinstance(w, bool) or not isinstance(w, (int, float, np.integer)) or int(w) != w:
                raise ValueError(f"width {w!r} of layer{s + 1}.{b} is not an integer")
            row.append(int(w))
        out.append(tuple(row))
    return tuple(out)


def as_lists(hidden) -> list[list[int]]:
    return [list(map(int, s)) for s in hidden]


def check_hidden(
    hidden,
    base: Sequence[Sequence[int]],
    ranges: dict[str, tuple[int, int]],
    min_depth: int | Sequence[int] | None = None,
    kind: str = "variable",
    hint: str = "",
) -> None:
    """The shape check of every width family: ``hidden`` against the ``base`` shape, where the
    blocks of ``ranges`` may take widths ``lo..hi`` and every other block keeps its base width;
    stage ``s`` may keep ``min_depth[s]..len(base[s])`` blocks (``None``: depth fixed). ``kind``
    names what the varying blocks are ("metamorphic", "slimmable") and ``hint`` ends the width
    message."""
    hidden = as_hidden(hidden)
    if len(hidden) != len(base):
        raise ValueError(f"shape has {len(hidden)} stages; the network has {len(base)}")
    for s, (stage, bstage) in enumerate(zip(hidden, base)):
        if min_depth is None:
            lo = len(bstage)
        else:
            lo = int(min_depth if isinstance(min_depth, int) else min_depth[s])
        if not lo <= len(stage) <= len(bstage):
            allowed = f"{lo}..{len(bstage)}" if lo < len(bstage) else f"only {len(bstage)}"
            fixed = "" if lo < len(bstage) else " (this family keeps the depth)"
            raise ValueError(
                f"stage {s + 1} keeps {len(stage)} blocks; allowed {allowed}{fixed}: "
                f"shape {as_lists(hidden)}, network {as_lists(base)}"
            )
        for b, w in enumerate(stage):
            name = f"layer{s + 1}.{b}"
            if name in ranges:
                a, z = ranges[name]
                if not a <= w <= z:
                    raise ValueError(
                        f"width {w} of {name} is outside the supported range {a}..{z}{hint}"
                    )
            elif w != bstage[b]:
                raise ValueError(
                    f"{name} is not {kind}: its width must stay {bstage[b]} (got {w}); "
                    f"{kind} blocks: {sorted(ranges) or 'none'}"
                )


def uniform_hidden(
    base: Sequence[Sequence[int]],
    blocks: Iterable[str],
    gamma: float,
    depth: int | Sequence[int] | None = None,
) -> list[list[int]]:
    """Every block of ``blocks`` at ``max(1, round(full * (1 - gamma)))`` hidden channels, the
    others at full width; each stage cut to its first ``depth`` blocks when given."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"compression ratio gamma={gamma} must be in [0, 1)")
    chosen = set(blocks)
    shape = []
    for s, stage in enumerate(base):
        keep = len(stage) if depth is None else (depth if isinstance(depth, int) else depth[s])
        keep = min(int(keep), len(stage))
        shape.append(
            [
                max(1, round(stage[b] * (1 - gamma))) if f"layer{s + 1}.{b}" in chosen else stage[b]
                for b in range(keep)
            ]
        )
    return shape


def hidden_arch(base: ResNetArch, hidden) -> ResNetArch:
    """``base`` with its hidden widths (and so its depth) replaced by ``hidden``."""
    arch = copy.deepcopy(base)
    arch.hidden = as_lists(hidden)
    return arch


class ResNetWidths(SubnetFamily):
    """The verbs for families whose descriptors are CIFAR ResNet ``hidden`` shapes.

    A subclass provides ``base_arch`` (a :class:`ResNetArch`), :meth:`width_ranges` (the blocks
    that vary and their supported widths), optionally :meth:`depth_floor` (fewest blocks per
    stage, ``None``: depth fixed), :meth:`sample_ranges` / :meth:`sample_depths` (what
    :meth:`sample` draws from: by default the supported space) and ``materialize``."""

    base_arch: ResNetArch
    shape_kind: str = "variable"

    def width_ranges(self) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def depth_floor(self) -> int | list[int] | None:
        return None

    def sample_ranges(self) -> dict[str, tuple[int, int]]:
        return self.width_ranges()

    def sample_depths(self) -> list[list[int]]:
        """Per stage the depths :meth:`sample` may draw."""
        floor = self.depth_floor()
        out = []
        for s, stage in enumerate(self.base_arch.hidden):
            if floor is None:
                out.append([len(stage)])
            else:
                lo = floor if isinstance(floor, int) else floor[s]
                out.append(list(range(int(lo), len(stage) + 1)))
        return out

    def full_width(self, block: str) -> int:
        s, b = block.removeprefix("layer").split(".")
        return self.base_arch.hidden[int(s) - 1][int(b)]

    def validate(self, desc) -> Hidden:
        hidden = as_hidden(desc)
        check_hidden(
            hidden, self.base_arch.hidden, self.width_ranges(), self.depth_floor(), self.shape_kind
        )
        return hidden

    def arch_for(self, desc) -> ResNetArch:
        return hidden_arch(self.base_arch, desc)

    def full(self) -> Hidden:
        return as_hidden(self.base_arch.hidden)

    def shape_for_gamma(
        self, gamma: float, depth: int | list[int] | None = None
    ) -> list[list[int]]:
        """Uniform compression ratio: every varying block at ``round((1-gamma) * full)``."""
        return uniform_hidden(self.base_arch.hidden, self.width_ranges(), gamma, depth)

    def for_ratio(self, gamma: float) -> Hidden:
        return as_hidden(self.shape_for_gamma(float(gamma)))

    def sample(self, rng: np.random.Generator) -> Hidden:
        ranges, depths = self.sample_ranges(), self.sample_depths()
        out = []
        for s, stage in enumerate(self.base_arch.hidden):
            d = int(rng.choice(depths[s]))
            row = []
            for b in range(d):
                name = f"layer{s + 1}.{b}"
                lo, hi = ranges.get(name, (stage[b], stage[b]))
                row.append(int(rng.integers(lo, hi + 1)))
            out.append(tuple(row))
        return self.validate(tuple(out))

    def gamma_of(self, desc) -> float:
        """Mean compression ratio ``1 - w / full`` of the varying blocks present in ``desc``."""
        ranges = self.width_ranges()
        ratios = [
            1 - w / self.full_width(f"layer{s + 1}.{b}")
            for s, stage in enumerate(desc)
            for b, w in enumerate(stage)
            if f"layer{s + 1}.{b}" in ranges
        ]
        return float(sum(ratios) / len(ratios)) if ratios else 0.0

    def cost_module(self, desc) -> nn.Module:
        with torch.device("meta"):
            return CifarResNet(self.arch_for(desc))

    def describe(self, desc) -> dict:
        hidden = self.validate(desc)
        return {
            "family": self.family_name,
            "hidden": as_lists(hidden),
            "gamma": round(self.gamma_of(hidden), 6),
            "depth": 2 + 2 * sum(len(s) for s in hidden),
            "seen": bool(self.is_seen(hidden)),
        }


# ------------------------------------------------------------------------------------------
# One network: a family with a single member (model files, searched networks)
# ------------------------------------------------------------------------------------------


@register_subnet_family
class SingleNetwork(SubnetFamily):
    """A plain network as a family of one member (descriptor ``"full"``), so that every tool
    that takes a family takes a model file too."""

    family_name = "single"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def validate(self, desc) -> str:
        if desc not in ("full", None):
            raise ValueError(f"descriptor {desc!r}: a single network has only 'full'")
        return "full"

    def materialize(self, desc="full") -> nn.Module:
        self.validate(desc)
        return self.model

    def cost_module(self, desc) -> nn.Module:
        return self.model

    def arch_for(self, desc="full"):
        self.validate(desc)
        return getattr(self.model, "arch", None)

    def describe(self, desc="full") -> dict:
        self.validate(desc)
        arch = getattr(self.model, "arch", None)
        out = {"family": self.family_name, "model": type(self.model).__name__}
        if isinstance(arch, ResNetArch):
            out["hidden"] = as_lists(arch.hidden)
        return out

    def full(self) -> str:
        return "full"

    def sample(self, rng: np.random.Generator) -> str:
        return "full"

    def for_ratio(self, gamma: float) -> str:
        if float(gamma) != 0.0:
            super().for_ratio(gamma)
        return "full"

    @classmethod
    def example(cls) -> SingleNetwork:
        from metamorph.models.resnet_cifar import cifar_resnet_arch

        torch.manual_seed(0)
        arch = cifar_resnet_arch(depth=8, stage_widths=[4, 8, 8])
        return cls(CifarResNet(arch).eval())


def as_family(source, k: int | None = None, seed: int = 0, data=None) -> SubnetFamily:
    """The sub-network family of a loaded source: an object that names its own
    (``subnet_family(k=, seed=, data=)``: a metamorphic or slimmable checkpoint's module), a
    family, or a plain network (a family of one)."""
    if hasattr(source, "subnet_family"):
        return source.subnet_family(k=k, seed=seed, data=data)
    if isinstance(source, SubnetFamily):
        return source
    if isinstance(source, nn.Module):
        return SingleNetwork(source)
    raise TypeError(f"{type(source).__name__} is not a sub-network family or a network")


__all__ = [
    "Hidden",
    "ResNetWidths",
    "SingleNetwork",
    "SubnetFamily",
    "as_family",
    "as_hidden",
    "as_lists",
    "check_hidden",
    "hidden_arch",
    "register_subnet_family",
    "subnet_families",
    "uniform_hidden",
]
