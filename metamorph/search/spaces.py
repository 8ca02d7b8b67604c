"""Genotype spaces: the bijective translation between genotypes and compressed networks.

A genotype is a float vector; every gene has a finite, sorted grid of allowed values:

- ``rate`` genes (pruning rates, metamorphic width reductions) live on the grid ``k / C`` of
  their layer's channel count ``C``. Continuous values (a Gaussian mutation, say) are snapped
  down to that grid (``k = floor(rate * C)``, GeneCAI's rule), which is :meth:`Space.repair`.
  Mutation adds ``N(0, sigma)``.
- ``level`` genes (Tucker rank bins, stage depths) are integer indices into a list of levels,
  the last being the uncompressed one. Mutation steps +-1 inside the valid (bounded) levels.

Decoding maps a repaired genotype to the network it stands for and encoding maps it back:
``encode(decode(g)) == g`` for every repaired ``g`` and ``decode(encode(p)) == p`` for every
network ``p`` of the space. No weights are changed by decoding (no retraining inside the search).

Every space is also a sub-network family (:mod:`metamorph.models.subnet`): its descriptors are
the decoded networks in hashable form (per-layer rank pairs, or ``hidden`` shapes), so the
family verbs (``validate``, ``materialize``, ``costs``, ``describe``, ``sample``...) work on the
searched networks; the network a space was built from is held for ``materialize`` but not
pickled to the search workers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metamorph.models.lowrank import (
    RankPair,
    Tucker2Conv,
    TuckerCache,
    build_lowrank,
    lowrank_layers,
    rank_levels,
)
from metamorph.models.pruning import (
    ChannelMasks,
    channel_order,
    channel_saliency,
    hidden_width,
    kept_channels,
    prunable_blocks,
    prune_physical,
)
from metamorph.models.resnet_cifar import CifarResNet, ResNetArch, cifar_resnet_arch
from metamorph.models.segments import block_position, set_submodule
from metamorph.models.subnet import (
    SubnetFamily,
    as_hidden,
    as_lists,
    check_hidden,
    hidden_arch,
    register_subnet_family,
)
from metamorph.search.flops import resnet_flops
from metamorph.utils.profile import count_params

EPS = 1e-9


@dataclass
class Gene:
    name: str
    kind: str  # "rate" | "level"
    grid: np.ndarray  # allowed values, ascending
    identity: float  # the uncompressed value

    def snap(self, v: float) -> float:
        if self.kind == "level":
            i = int(np.clip(np.rint(v), self.grid[0], self.grid[-1]))
            return float(i)
        v = float(np.clip(v, self.grid[0], self.grid[-1]))
        i = int(np.searchsorted(self.grid, v + EPS, side="right")) - 1
        return float(self.grid[max(0, i)])

    @property
    def most_aggressive(self) -> float:
        return float(self.grid[-1] if self.kind == "rate" else self.grid[0])


def _rate_grid(lo: int, hi: int, full: int) -> np.ndarray:
    """``k / full`` for ``k = lo..hi`` channels removed."""
    return np.array([k / full for k in range(lo, hi + 1)], dtype=np.float64)


class Space(SubnetFamily):
    """Base class: genes, bound-sweep units, repair, encode/decode and analytic FLOPs; and the
    sub-network family verbs over descriptors (:meth:`descriptor` of a genotype, :meth:`genotype`
    of a descriptor)."""

    phase = "base"
    genes: list[Gene]
    units: list[list[int]]  # genes swept together when extracting per-layer bounds
    input_size: tuple[int, int] = (32, 32)
    source: nn.Module | None = None  # the network the space decodes to (not pickled)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("source", None)
        state.pop("_cache", None)
        return state

    # ------------------------------------------------------------------ family verbs
    def descriptor(self, g: np.ndarray):
        """The hashable descriptor of genotype ``g`` (its decoded network)."""
        raise NotImplementedError

    def genotype(self, desc) -> np.ndarray:
        """The genotype of descriptor ``desc`` (a clear error when it is not in the space)."""
        raise NotImplementedError

    def _genotype_of(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) if isinstance(x, np.ndarray) else self.genotype(x)

    def validate(self, desc):
        return self.descriptor(self.genotype(desc))

    def full(self):
        return self.descriptor(self.identity())

    def sample(self, rng: np.random.Generator):
        g = np.array([float(rng.choice(gene.grid)) for gene in self.genes])
        return self.descriptor(self.repair(g))

    def _source(self) -> nn.Module:
        if self.source is None:
            raise ValueError(
                f"this {type(self).__name__} has no network to materialize (spaces unpickled in "
                "search workers hold none); build the space from the network"
            )
        return self.source

    def costs(self, desc, input_size: tuple[int, int] | None = None) -> dict[str, int]:
        """Parameters of the member and its analytic FLOPs (the search's fitness)."""
        g = self.genotype(desc)
        return {"params": count_params(self.cost_module(desc)), "flops": int(self.flops(g))}

    @property
    def n_var(self) -> int:
        return len(self.genes)

    def identity(self) -> np.ndarray:
        return np.array([g.identity for g in self.genes], dtype=np.float64)

    def canonical(self, g: np.ndarray) -> np.ndarray:
        """Space-specific canonical form of a snapped genotype (default: itself)."""
        return g

    def repair(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        one = X.ndim == 1
        X2 = np.atleast_2d(X).copy()
        for r in range(len(X2)):
            for i, gene in enumerate(self.genes):
                X2[r, i] = gene.snap(X2[r, i])
            X2[r] = self.canonical(X2[r])
        return X2[0] if one else X2

    def is_valid(self, g: np.ndarray) -> bool:
        return bool(np.array_equal(self.repair(g), np.asarray(g, dtype=np.float64)))

    def decode(self, g: np.ndarray):
        raise NotImplementedError

    def encode(self, phenotype) -> np.ndarray:
        raise NotImplementedError

    def flops(self, g: np.ndarray) -> int:
        raise NotImplementedError

    def sweep_candidates(self, unit: list[int], step: float = 0.05) -> list[np.ndarray]:
        """Genotypes compressing only ``unit`` (everything else at identity), from the most
        aggressive setting to the least, identity excluded."""
        base = self.identity()
        genes = [self.genes[i] for i in unit]
        out: list[np.ndarray] = []
        if all(g.kind == "rate" for g in genes):
            n = int(round(1.0 / step))
            targets = [1.0 - j * step for j in range(n)]  # 1.0, 0.95, ..., step
            for t in targets:
                g = base.copy()
                for i in unit:
                    g[i] = self.genes[i].snap(min(t, self.genes[i].grid[-1]))
                out.append(g)
        else:
            n_levels = max(len(g.grid) for g in genes)
            for b in range(n_levels - 1):
                g = base.copy()
                for i in unit:
                    gene = self.genes[i]
                    g[i] = float(min(b, len(gene.grid) - 1)) if gene.kind == "level" else g[i]
                out.append(g)
        uniq: list[np.ndarray] = []
        seen = {tuple(base)}
        for g in out:
            g = self.repair(g)
            if tuple(g) not in seen:
                seen.add(tuple(g))
                uniq.append(g)
        return uniq


# ------------------------------------------------------------------------------------------
# Low-rank decomposition
# ------------------------------------------------------------------------------------------


def decomposable_convs(model: nn.Module, exclude_stem: bool = True) -> list[str]:
    """Names of the plain k x k (k > 1) convolutions, in network order."""
    names = []
    for n, m in model.named_modules():
        if isinstance(m, Tucker2Conv):
            continue
        if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and m.groups == 1:
            if ".core" in n or ".first" in n or ".last" in n:
                continue
            if exclude_stem and n == "conv1":
                continue
            names.append(n)
    return names


@register_subnet_family
class DecompositionSpace(Space):
    """Two rank-bin genes per k x k conv, ``(r_in level, r_out level)``; the top level of both is
    the original conv. The stem conv (3 input channels) is excluded by default. Descriptor: one
    ``(r_in, r_out)`` pair per decomposable conv (:attr:`layers` order)."""

    phase = "decompose"
    family_name = "lowrank"

    def __init__(
        self,
        model: nn.Module,
        bins: int = 8,
        exclude_stem: bool = True,
        input_size: tuple[int, int] = (32, 32),
    ) -> None:
        if lowrank_layers(model):
            raise ValueError("the network is already decomposed; decompose the original network")
        self.arch: ResNetArch = copy.deepcopy(model.arch)
        self.source = model
        self.bins = int(bins)
        self.input_size = tuple(input_size)
        self.layers = decomposable_convs(model, exclude_stem)
        if not self.layers:
            raise ValueError("no k x k convolution to decompose")
        self.channels: dict[str, tuple[int, int]] = {}
        self.levels: dict[str, tuple[list[int], list[int]]] = {}
        self.genes, self.units = [], []
        for name in self.layers:
            conv = model.get_submodule(name)
            c_in, c_out = conv.in_channels, conv.out_channels
            self.channels[name] = (c_in, c_out)
            lv_in, lv_out = rank_levels(c_in, self.bins), rank_levels(c_out, self.bins)
            self.levels[name] = (lv_in, lv_out)
            i = len(self.genes)
            self.genes.append(
                Gene(f"{name}:r_in", "level", np.arange(len(lv_in), dtype=float), len(lv_in) - 1)
            )
            self.genes.append(
                Gene(f"{name}:r_out", "level", np.arange(len(lv_out), dtype=float), len(lv_out) - 1)
            )
            self.units.append([i, i + 1])

    def decode(self, g: np.ndarray) -> dict[str, tuple[int, int]]:
        """``{conv name: (r_in, r_out)}`` for every decomposable conv (full ranks = original)."""
        g = np.asarray(g)
        out = {}
        for j, name in enumerate(self.layers):
            lv_in, lv_out = self.levels[name]
            out[name] = (lv_in[int(g[2 * j])], lv_out[int(g[2 * j + 1])])
        return out

    def encode(self, ranks: dict[str, tuple[int, int]]) -> np.ndarray:
        g = self.identity()
        for j, name in enumerate(self.layers):
            if name not in ranks:
                continue
            lv_in, lv_out = self.levels[name]
            r_in, r_out = ranks[name]
            if r_in not in lv_in or r_out not in lv_out:
                raise ValueError(
                    f"ranks {ranks[name]} of {name} are not on its bins {lv_in}/{lv_out}"
                )
            g[2 * j], g[2 * j + 1] = lv_in.index(r_in), lv_out.index(r_out)
        return g

    def lowrank(self, g: np.ndarray) -> dict[str, RankPair]:
        """The Tucker-2 layers of ``g`` with ``None`` for a mode kept at full rank."""
        out = {}
        for name, (r_in, r_out) in self.decode(g).items():
            c_in, c_out = self.channels[name]
            if r_in == c_in and r_out == c_out:
                continue
            out[name] = (r_in if r_in < c_in else None, r_out if r_out < c_out else None)
        return out

    def flops(self, g: np.ndarray) -> int:
        return resnet_flops(self.arch, self.lowrank(g), self.input_size)

    def describe(self, x) -> dict:
        """The ranks of the decomposed convs, of a descriptor or a genotype."""
        g = self._genotype_of(x)
        return {"ranks": {n: list(r) for n, r in self.decode(g).items() if r != self.channels[n]}}

    def descriptor(self, g: np.ndarray) -> tuple[tuple[int, int], ...]:
        ranks = self.decode(g)
        return tuple((int(ranks[n][0]), int(ranks[n][1])) for n in self.layers)

    def genotype(self, desc) -> np.ndarray:
        if not isinstance(desc, (list, tuple)) or len(desc) != len(self.layers):
            raise ValueError(
                f"a {self.family_name} descriptor is one (r_in, r_out) pair per decomposable conv "
                f"({len(self.layers)}: {self.layers}); got {desc!r}"
            )
        return self.encode({n: tuple(int(r) for r in pair) for n, pair in zip(self.layers, desc)})

    def arch_for(self, desc) -> dict:
        """The ``cifar_resnet_lowrank`` architecture of the member (``ResNetArch`` + ranks)."""
        ranks = self.lowrank(self.genotype(desc))
        return {**self.arch.to_dict(), "lowrank": {n: list(r) for n, r in ranks.items()}}

    def cost_module(self, desc) -> nn.Module:
        with torch.device("meta"):
            return build_lowrank(self.arch_for(desc))

    @torch.no_grad()
    def materialize(self, desc) -> nn.Module:
        """The source network with each conv of ``desc`` replaced by its Tucker-2 layer
        (truncated HOSVD, computed once per layer and rank pair)."""
        g = self.genotype(desc)
        model = self._source()
        if getattr(self, "_cache", None) is None:
            self._cache = TuckerCache(model, self.layers)
        net = copy.deepcopy(model)
        for name, (r_in, r_out) in self.lowrank(g).items():
            c_in, c_out = self.channels[name]
            layer = self._cache.layer(name, r_in or c_in, r_out or c_out)
            set_submodule(net, name, copy.deepcopy(layer))
        return net.eval()

    @classmethod
    def example(cls) -> DecompositionSpace:
        torch.manual_seed(0)
        return cls(CifarResNet(cifar_resnet_arch(depth=8, stage_widths=[4, 8, 8])).eval(), bins=4)


# ------------------------------------------------------------------------------------------
# Structured pruning
# ------------------------------------------------------------------------------------------


@register_subnet_family
class PruningSpace(Space):
    """One rate gene per BasicBlock hidden layer, on the grid ``k / C`` (k channels pruned,
    ``k <= C - 1``), with channels removed in a fixed saliency order. Descriptor: the ``hidden``
    shape of the pruned network (depth kept)."""

    phase = "prune"
    family_name = "pruned"

    def __init__(
        self,
        model: nn.Module,
        order: dict[str, torch.Tensor],
        input_size: tuple[int, int] = (32, 32),
    ) -> None:
        self.arch: ResNetArch = copy.deepcopy(model.arch)
        self.source = model
        self.lowrank_map = lowrank_layers(model)
        self.input_size = tuple(input_size)
        self.blocks = prunable_blocks(model)
        self.order = {b: torch.as_tensor(order[b], dtype=torch.long).clone() for b in self.blocks}
        self.widths = {b: hidden_width(model, b) for b in self.blocks}
        self.genes = [
            Gene(b, "rate", _rate_grid(0, self.widths[b] - 1, self.widths[b]), 0.0)
            for b in self.blocks
        ]
        self.units = [[i] for i in range(len(self.genes))]

    def decode(self, g: np.ndarray) -> dict[str, int]:
        """``{block: number of pruned hidden channels}``."""
        return {
            b: int(math.floor(float(v) * self.widths[b] + 1e-6)) for b, v in zip(self.blocks, g)
        }

    def encode(self, pruned: dict[str, int]) -> np.ndarray:
        g = self.identity()
        for i, b in enumerate(self.blocks):
            k = int(pruned.get(b, 0))
            if not 0 <= k < self.widths[b]:
                raise ValueError(f"{k} pruned channels of {b} outside 0..{self.widths[b] - 1}")
            g[i] = self.genes[i].grid[k]
        return g

    def keep(self, g: np.ndarray) -> dict[str, torch.Tensor]:
        """Kept channel indices per block (sorted)."""
        return {b: kept_channels(self.order[b], k) for b, k in self.decode(g).items()}

    def hidden(self, g: np.ndarray) -> list[list[int]]:
        hidden = [list(s) for s in self.arch.hidden]
        for b, k in self.decode(g).items():
            s, j = block_position(b)
            hidden[s][j] = self.widths[b] - k
        return hidden

    def flops(self, g: np.ndarray) -> int:
        return resnet_flops(
            hidden_arch(self.arch, self.hidden(g)), self.lowrank_map, self.input_size
        )

    def describe(self, x) -> dict:
        """The hidden widths of the pruned network, of a descriptor or a genotype."""
        return {"hidden": self.hidden(self._genotype_of(x))}

    def descriptor(self, g: np.ndarray):
        return as_hidden(self.hidden(g))

    def genotype(self, desc) -> np.ndarray:
        hidden = as_hidden(desc)
        ranges = {b: (1, w) for b, w in self.widths.items()}
        check_hidden(hidden, self.arch.hidden, ranges, None, "prunable", " (pruning only shrinks)")
        pruned = {}
        for b in self.blocks:
            s, j = block_position(b)
            pruned[b] = self.widths[b] - hidden[s][j]
        return self.encode(pruned)

    def arch_for(self, desc) -> dict:
        arch = hidden_arch(self.arch, self.validate(desc)).to_dict()
        return {**arch, "lowrank": {n: list(r) for n, r in self.lowrank_map.items()}}

    def cost_module(self, desc) -> nn.Module:
        with torch.device("meta"):
            return build_lowrank(self.arch_for(desc))

    def materialize(self, desc) -> nn.Module:
        """The source network physically pruned to ``desc`` (kept channels in saliency order)."""
        return prune_physical(self._source(), self.keep(self.genotype(desc))).eval()

    @torch.no_grad()
    def forward_at(self, x: torch.Tensor, desc) -> torch.Tensor:
        """The search's own forward: the source network with the pruned channels masked."""
        model = self._source()
        masks = ChannelMasks(model, self.blocks)
        try:
            masks.set(self.keep(self.genotype(desc)))
            return model(x)
        finally:
            masks.remove()

    @classmethod
    def example(cls) -> PruningSpace:
        torch.manual_seed(0)
        model = CifarResNet(cifar_resnet_arch(depth=8, stage_widths=[4, 8, 8])).eval()
        return cls(model, channel_order(channel_saliency(model, criterion="l1")))


def uniform_rate_genotype(space: PruningSpace, rate: float) -> np.ndarray:
    """The same pruning rate in every block (snapped to each block's grid)."""
    return space.repair(np.full(space.n_var, float(rate)))


# ------------------------------------------------------------------------------------------
# Metamorphic widths (and depths) through an INR
# ------------------------------------------------------------------------------------------


@register_subnet_family
class MetamorphSpace(Space):
    """Per metamorphic block a width-reduction rate on ``k / full`` (width = full - k) inside the
    trained width range (or ``[min_ratio, max_ratio] * full``); with ``depth=True`` and a
    checkpoint trained over depths, one level gene per stage over its allowed depths. Width genes
    of blocks a shallower stage drops are canonically 0 (the repair sets them)."""

    phase = "metamorph"
    family_name = "metamorphic_search"

    def __init__(
        self,
        net,
        min_ratio: float | None = None,
        max_ratio: float | None = None,
        depth: bool = True,
        input_size: tuple[int, int] = (32, 32),
    ) -> None:
        from metamorph.hypernet.sampling import width_range

        self.arch: ResNetArch = copy.deepcopy(net.base_arch)
        self.source = net
        self.input_size = tuple(input_size)
        base = self.arch.hidden
        self.meta_blocks = sorted(
            net.meta_blocks, key=lambda n: tuple(int(v) for v in n.removeprefix("layer").split("."))
        )
        self.genes, self.units = [], []
        self.width_gene: dict[str, int] = {}
        self.full_widths: dict[str, int] = {}
        for name in self.meta_blocks:
            full = net.full_width(name)
            lo, hi = width_range(net, name)
            if min_ratio is not None:
                lo = max(1, math.ceil(min_ratio * full - 1e-9))
            if max_ratio is not None:
                hi = max(lo, math.floor(max_ratio * full + 1e-9))
            hi = min(hi, net.max_width(name))
            k_lo, k_hi = max(0, full - hi), full - lo
            if k_hi < k_lo:
                raise ValueError(f"empty width range for {name}: {lo}..{hi} (full {full})")
            self.full_widths[name] = full
            self.width_gene[name] = len(self.genes)
            grid = _rate_grid(k_lo, k_hi, full) if k_hi >= 0 else np.array([0.0])
            self.genes.append(Gene(name, "rate", grid, float(grid[0])))
            self.units.append([len(self.genes) - 1])
        self.depth_levels: list[list[int]] = []
        self.depth_gene: dict[int, int] = {}
        choices = list(net.spec.depth_choices or [])
        for s, stage in enumerate(base):
            if depth and choices:
                allowed = sorted({min(int(c), len(stage)) for c in choices if int(c) >= 1})
                allowed = sorted(set(allowed) | {len(stage)})
            else:
                allowed = [len(stage)]
            self.depth_levels.append(allowed)
            if len(allowed) > 1:
                self.depth_gene[s] = len(self.genes)
                self.genes.append(
                    Gene(
                        f"stage{s + 1}:depth",
                        "level",
                        np.arange(len(allowed), dtype=float),
                        len(allowed) - 1,
                    )
                )
                self.units.append([len(self.genes) - 1])
        if not self.genes:
            raise ValueError(
                "the metamorphic network has nothing to search (no width or depth range)"
            )

    def _depths(self, g: np.ndarray) -> list[int]:
        out = []
        for s, allowed in enumerate(self.depth_levels):
            out.append(allowed[int(g[self.depth_gene[s]])] if s in self.depth_gene else allowed[-1])
        return out

    def canonical(self, g: np.ndarray) -> np.ndarray:
        depths = self._depths(g)
        for name, i in self.width_gene.items():
            s, b = (int(v) for v in name.removeprefix("layer").split("."))
            if b >= depths[s - 1]:
                g[i] = self.genes[i].identity
        return g

    def decode(self, g: np.ndarray) -> list[list[int]]:
        """The ``hidden`` shape (per-stage lists of block widths) for ``emit(hidden)``."""
        depths = self._depths(g)
        hidden = []
        for s, stage in enumerate(self.arch.hidden):
            row = []
            for b in range(depths[s]):
                name = f"layer{s + 1}.{b}"
                if name in self.width_gene:
                    k = int(
                        math.floor(float(g[self.width_gene[name]]) * self.full_widths[name] + 1e-6)
                    )
                    row.append(self.full_widths[name] - k)
                else:
                    row.append(stage[b])
            hidden.append(row)
        return hidden

    def width_ranges(self) -> dict[str, tuple[int, int]]:
        """The searched widths of each metamorphic block."""
        out = {}
        for name, i in self.width_gene.items():
            grid, full = self.genes[i].grid, self.full_widths[name]
            out[name] = (full - round(grid[-1] * full), full - round(grid[0] * full))
        return out

    def encode(self, hidden: list[list[int]]) -> np.ndarray:
        hidden = as_hidden(hidden)
        floor = [levels[0] for levels in self.depth_levels]
        check_hidden(
            hidden, self.arch.hidden, self.width_ranges(), floor, "metamorphic", " searched"
        )
        g = self.identity()
        for s, row in enumerate(hidden):
            if len(row) not in self.depth_levels[s]:
                raise ValueError(
                    f"stage {s + 1} depth {len(row)} is not searchable; choose {self.depth_levels[s]}"
                )
            if s in self.depth_gene:
                g[self.depth_gene[s]] = self.depth_levels[s].index(len(row))
            for b, w in enumerate(row):
                name = f"layer{s + 1}.{b}"
                if name in self.width_gene:
                    i = self.width_gene[name]
                    grid = self.genes[i].grid
                    hit = np.flatnonzero(
                        np.isclose(grid, (self.full_widths[name] - w) / self.full_widths[name])
                    )
                    g[i] = grid[hit[0]]
        return g

    def flops(self, g: np.ndarray) -> int:
        return resnet_flops(hidden_arch(self.arch, self.decode(g)), None, self.input_size)

    def describe(self, x) -> dict:
        """The ``hidden`` shape, of a descriptor or a genotype."""
        return {"hidden": self.decode(self._genotype_of(x))}

    def descriptor(self, g: np.ndarray):
        return as_hidden(self.decode(g))

    def genotype(self, desc) -> np.ndarray:
        return self.encode(desc)

    def arch_for(self, desc) -> ResNetArch:
        return hidden_arch(self.arch, self.validate(desc))

    def cost_module(self, desc) -> nn.Module:
        with torch.device("meta"):
            return CifarResNet(self.arch_for(desc))

    def materialize(self, desc) -> nn.Module:
        return self._source().materialize(as_lists(self.validate(desc)))

    def forward_at(self, x: torch.Tensor, desc) -> torch.Tensor:
        return self._source().forward_at(x, self.validate(desc))

    @classmethod
    def example(cls) -> MetamorphSpace:
        from metamorph.hypernet.metanet import MetaResNet

        return cls(MetaResNet.example())
