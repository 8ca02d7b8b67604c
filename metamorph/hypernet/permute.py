"""Function-preserving channel permutation for weight smoothness (NeuMeta, Yang & Wang 2024, Sec. 3.3).

A hidden unit of a network can be moved to another index without changing the function, as long as
every tensor slice that belongs to that unit moves with it. NeuMeta uses this freedom to make the
weights of a pretrained network *smooth* along their channel dimensions before an implicit neural
representation (INR) learns them: for every group of coupled channels it solves a (multi-objective)
shortest Hamiltonian path over the channels and reorders them along that path.

This module does the same for :class:`~metamorph.models.resnet_cifar.CifarResNet`, deriving the
channel groups from the architecture itself (no ``torch_pruning`` dependency graph needed):

* :func:`channel_groups` lists the groups (:class:`ChannelGroup`) and, for each, every
  ``(state_dict key, dim, positions)`` slice that moves with its channels;
* :func:`smoothness_order` solves the open shortest Hamiltonian path with ``fast_tsp``;
* :func:`apply_permutations` / :func:`random_orders` apply arbitrary orders (e.g. for tests);
* :func:`permute_for_smoothness` runs the whole pipeline on a copy and returns a
  :class:`PermutationReport`; :func:`total_variation` is NeuMeta's TV metric.

The RGB input channels of the stem convolution and the class outputs of the classifier are never
permuted (permuting them changes the function; NeuMeta issue #3).

Groups
------
*Hidden groups* (one per BasicBlock): ``conv1.weight`` dim 0, ``conv1.bias``, ``bn1.*`` (weight,
bias, running_mean, running_var) and ``conv2.weight`` dim 1.

*Residual groups* couple everything that reads from or writes to the residual stream. A block's
``conv1`` input (dim 1) belongs to the stream the block *reads* (for the first block of a stage
this is the previous stage's stream), its ``conv2`` output (dim 0, bias, ``bn2``) to the stream it
writes. How streams of consecutive stages are linked depends on the shortcut:

* identity: the same channel positions (the stream continues);
* option B (1x1 projection + BN): the projection's input (dim 1) belongs to the previous stream, its
  output (dim 0, bias, BN) starts a new group that owns the whole new stream;
* option A (subsample + zero-pad ``pad_front`` channels in front): channel ``c`` of the previous
  stream reappears as channel ``c + pad_front``. Channels therefore form *lineages* across stages:
  the stem/stage-1 group also owns its shifted images in every later stage, and the zero-padded
  positions of a stage start a new group (with their own images in later stages). A group is
  permuted identically at every stage it touches (the path order is assigned to the group's
  positions in sorted order; the shift is monotone), so the padding keeps landing on the padded
  positions and the function is exactly preserved.

The block-variant scalars (``alpha``, ``shortcut_scale``) do not move.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from metamorph.models.resnet_cifar import CifarResNet, ShortcutA

__all__ = [
    "ChannelGroup",
    "GroupMember",
    "GroupResult",
    "PermutationReport",
    "apply_permutations",
    "channel_groups",
    "group_features",
    "path_cost",
    "permute_for_smoothness",
    "random_orders",
    "smoothness_order",
    "total_variation",
]

_BN_KEYS = ("weight", "bias", "running_mean", "running_var")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# fast_tsp (>= 0.2) stores distances as uint16.
_TSP_MAX_DIST = 2**16 - 1


# --------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupMember:
    """One tensor slice that moves with a group's channels.

    ``positions[i]`` is the index along ``dim`` of ``key`` (a ``state_dict`` key) that belongs to the
    group's ``i``-th channel. ``is_parameter`` is False for BN running statistics: they move with
    the channels but do not enter the smoothness objective or the TV metric.
    """

    key: str
    dim: int
    positions: tuple[int, ...]
    is_parameter: bool = True


@dataclass
class ChannelGroup:
    """Channels that must be permuted together and every slice that moves with them.

    ``positions`` are the group's channel indices where it originates (the block's hidden channels,
    or the residual-stream positions in the stage that created the lineage); ``stage_positions``
    maps each 1-based stage a residual group touches to its positions there (empty for hidden
    groups). All members hold ``len(positions)`` positions, listed in the same channel order.
    """

    name: str
    kind: str  # "hidden" or "residual"
    positions: list[int]
    members: list[GroupMember] = field(default_factory=list)
    stage_positions: dict[int, list[int]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.positions)

    def add(self, key: str, dim: int, positions: Sequence[int], is_parameter: bool = True) -> None:
        positions = tuple(int(p) for p in positions)
        if len(positions) != self.size:
            raise ValueError(
                f"group {self.name}: member {key}[dim {dim}] has {len(positions)} positions, "
                f"expected {self.size}"
            )
        self.members.append(GroupMember(key, dim, positions, is_parameter))


def _add_conv_out(group: ChannelGroup, model: nn.Module, conv: str, bn: str | None, pos) -> None:
    """Output channels of ``conv`` (+ its bias and the BN that follows it, if any)."""
    group.add(f"{conv}.weight", 0, pos)
    if model.get_submodule(conv).bias is not None:
        group.add(f"{conv}.bias", 0, pos)
    if bn is not None:
        bn_mod = model.get_submodule(bn)
        if isinstance(bn_mod, nn.BatchNorm2d):
            for k in _BN_KEYS:
                if getattr(bn_mod, k, None) is not None:
                    group.add(f"{bn}.{k}", 0, pos, is_parameter=k in ("weight", "bias"))


class _Stream:
    """The residual stream of one stage: which lineage owns which channel position."""

    def __init__(self, stage: int, lineages: list[tuple[ChannelGroup, list[int]]]) -> None:
        self.stage = stage  # 1-based
        self.lineages = lineages  # (group, sorted positions in this stream)

    def add_in(self, key: str, dim: int) -> None:
        for g, pos in self.lineages:
            g.add(key, dim, pos)

    def add_out(self, model: nn.Module, conv: str, bn: str | None) -> None:
        for g, pos in self.lineages:
            _add_conv_out(g, model, conv, bn, pos)


def channel_groups(model: CifarResNet) -> list[ChannelGroup]:
    """The channel groups of a :class:`CifarResNet`, derived from its structure.

    Works for unfolded (BatchNorm present) and BN-folded models, any stage/hidden widths, any number
    of blocks per stage, shortcut A or B and every block variant. Hidden groups come first (in
    block order), then residual groups (in order of origin). The stem's RGB input and the
    classifier's class outputs belong to no group.
    """
    if not isinstance(model, CifarResNet):
        raise TypeError(f"channel_groups expects a CifarResNet, got {type(model).__name__}")
    hidden_groups: list[ChannelGroup] = []
    residual_groups: list[ChannelGroup] = []

    def new_lineage(stage: int, pos: list[int], how: str) -> ChannelGroup:
        g = ChannelGroup(f"residual.stage{stage}.{how}", "residual", list(pos))
        g.stage_positions[stage] = list(pos)
        residual_groups.append(g)
        return g

    w0 = model.conv1.out_channels
    stem = new_lineage(1, list(range(w0)), "stem")
    _add_conv_out(stem, model, "conv1", "bn1", range(w0))
    stream = _Stream(1, [(stem, list(range(w0)))])

    for s, stage in enumerate(model.stages(), start=1):
        for b, block in enumerate(stage):
            p = f"layer{s}.{b}"
            # Hidden channels of the block.
            h = block.conv1.out_channels
            hg = ChannelGroup(f"{p}.hidden", "hidden", list(range(h)))
            _add_conv_out(hg, model, f"{p}.conv1", f"{p}.bn1", range(h))
            hg.add(f"{p}.conv2.weight", 1, range(h))
            hidden_groups.append(hg)
            # Residual stream: what the block reads ...
            stream.add_in(f"{p}.conv1.weight", 1)
            sc = block.shortcut
            width_out = block.conv2.out_channels
            if isinstance(sc, nn.Identity):
                if stream.stage != s:  # identity across a stage boundary: same positions
                    for g, pos in stream.lineages:
                        g.stage_positions[s] = list(pos)
                    stream = _Stream(s, stream.lineages)
            elif isinstance(sc, ShortcutA):
                width_in = block.conv1.in_channels
                shifted = []
                for g, pos in stream.lineages:
                    new_pos = [c + sc.pad_front for c in pos]
                    g.stage_positions[s] = new_pos
                    shifted.append((g, new_pos))
                padded = list(range(sc.pad_front)) + list(range(sc.pad_front + width_in, width_out))
                if padded:
                    shifted.append((new_lineage(s, padded, "pad"), padded))
                stream = _Stream(s, shifted)
            elif isinstance(sc, nn.Sequential):
                stream.add_in(f"{p}.shortcut.0.weight", 1)
                full = list(range(width_out))
                proj = new_lineage(s, full, "proj")
                _add_conv_out(proj, model, f"{p}.shortcut.0", f"{p}.shortcut.1", full)
                stream = _Stream(s, [(proj, full)])
            else:
                raise TypeError(f"{p}: unsupported shortcut {type(sc).__name__}")
            # ... and what it writes.
            stream.add_out(model, f"{p}.conv2", f"{p}.bn2")
    stream.add_in("fc.weight", 1)
    return hidden_groups + residual_groups


# --------------------------------------------------------------------------------------------------
# Applying orders
# --------------------------------------------------------------------------------------------------


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters())
    out.update(dict(model.named_buffers()))
    return out


def _as_order_map(
    groups: Sequence[ChannelGroup],
    orders: Mapping[str, Sequence[int]] | Sequence[Sequence[int]],
) -> dict[str, list[int]]:
    if isinstance(orders, Mapping):
        names = {g.name for g in groups}
        unknown = set(orders) - names
        if unknown:
            raise KeyError(f"orders for unknown groups {sorted(unknown)}")
        return {k: [int(i) for i in v] for k, v in orders.items()}
    if len(orders) != len(groups):
        raise ValueError(f"got {len(orders)} orders for {len(groups)} groups")
    return {g.name: [int(i) for i in o] for g, o in zip(groups, orders)}


@torch.no_grad()
def apply_permutations(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    orders: Mapping[str, Sequence[int]] | Sequence[Sequence[int]],
) -> nn.Module:
    """Reorder the channels of ``groups`` in place and return ``model``.

    ``orders`` maps group names to orders (groups without an entry stay put) or is a sequence
    aligned with ``groups``. For an order ``o`` the group's ``i``-th position receives what was at
    its ``o[i]``-th position, in every member tensor.
    """
    tensors = _tensors(model)
    order_map = _as_order_map(groups, orders)
    for g in groups:
        if g.name not in order_map:
            continue
        order = order_map[g.name]
        if sorted(order) != list(range(g.size)):
            raise ValueError(f"order for group {g.name} is not a permutation of range({g.size})")
        if order == list(range(g.size)):
            continue
        perm = torch.tensor(order, dtype=torch.long)
        for m in g.members:
            t = tensors[m.key]
            pos = torch.tensor(m.positions, dtype=torch.long, device=t.device)
            src = t.index_select(m.dim, pos[perm.to(t.device)])
            t.index_copy_(m.dim, pos, src)
    return model


def random_orders(
    groups: Sequence[ChannelGroup], generator: torch.Generator | None = None
) -> dict[str, list[int]]:
    """One uniformly random order per group (e.g. the "Random" baseline, or for tests)."""
    return {g.name: torch.randperm(g.size, generator=generator).tolist() for g in groups}


# --------------------------------------------------------------------------------------------------
# Smoothness objective and its solver
# --------------------------------------------------------------------------------------------------


def group_features(
    model_or_state: nn.Module | Mapping[str, torch.Tensor], group: ChannelGroup
) -> torch.Tensor:
    """``[size, f]`` float64 features: each channel's slices of all parameter members, flattened.

    L1 distances between these rows are the sum of the L1 distances in every coupled tensor, i.e.
    the multi-objective SHP of NeuMeta realised by concatenation. BN running stats are left out.
    """
    tensors = _tensors(model_or_state) if isinstance(model_or_state, nn.Module) else model_or_state
    parts = []
    for m in group.members:
        if not m.is_parameter:
            continue
        t = tensors[m.key].detach()
        pos = torch.tensor(m.positions, dtype=torch.long, device=t.device)
        parts.append(
            t.index_select(m.dim, pos).movedim(m.dim, 0).reshape(group.size, -1).double().cpu()
        )
    if not parts:
        return torch.zeros(group.size, 0, dtype=torch.float64)
    return torch.cat(parts, dim=1)


def path_cost(features: torch.Tensor, order: Sequence[int] | torch.Tensor | None = None) -> float:
    """L1 length of the open path visiting the rows of ``features`` in ``order`` (default: as is)."""
    f = features if order is None else features[torch.as_tensor(order, dtype=torch.long)]
    if f.shape[0] < 2:
        return 0.0
    return float((f[1:] - f[:-1]).abs().sum())


def _greedy_path(dist: torch.Tensor) -> list[int]:
    """Nearest-neighbour open path; every start tried for small n, the best one kept."""
    n = dist.shape[0]
    starts = range(n) if n <= 256 else [int(dist.sum(1).argmax())]
    best, best_cost = None, float("inf")
    for start in starts:
        visited = torch.zeros(n, dtype=torch.bool)
        path, cost, cur = [start], 0.0, start
        visited[start] = True
        for _ in range(n - 1):
            d = dist[cur].masked_fill(visited, float("inf"))
            nxt = int(d.argmin())
            cost += float(d[nxt])
            visited[nxt] = True
            path.append(nxt)
            cur = nxt
        if cost < best_cost:
            best, best_cost = path, cost
    return best


def smoothness_order(features: torch.Tensor, time_limit: float = 1.0) -> torch.Tensor:
    """Open shortest Hamiltonian path over the rows of ``features`` (pairwise L1 distances).

    Solved with ``fast_tsp.find_tour`` (exact up to 20 cities, a local search within
    ``time_limit`` seconds beyond) on the integer-scaled distance matrix plus a dummy city at
    distance 0 from all others, which turns the closed tour into an open path. Falls back to a
    greedy nearest-neighbour path if ``fast_tsp`` is missing or fails. Returns a ``LongTensor``
    permutation of ``range(n)``, oriented so that ``order[0] < order[-1]``.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [n, f], got shape {tuple(features.shape)}")
    n = features.shape[0]
    if n <= 2:
        return torch.arange(n, dtype=torch.long)
    feats = features.detach().double().cpu()
    dist = torch.cdist(feats, feats, p=1)
    dist = 0.5 * (dist + dist.T)
    dist.fill_diagonal_(0.0)
    if n == 3:
        # The best open path over three points leaves out the longest edge.
        edges = {(0, 1): dist[0, 1], (0, 2): dist[0, 2], (1, 2): dist[1, 2]}
        i, j = max(edges, key=lambda e: float(edges[e]))
        mid = 3 - i - j
        order = [i, mid, j]
    else:
        dmax = float(dist.max())
        if not dmax > 0 or not torch.isfinite(dist).all():
            return torch.arange(n, dtype=torch.long)
        order = None
        try:
            import fast_tsp

            scaled = torch.round(dist / dmax * _TSP_MAX_DIST).to(torch.int64)
            full = torch.zeros(n + 1, n + 1, dtype=torch.int64)
            full[1:, 1:] = scaled
            tour = fast_tsp.find_tour(full.numpy(), float(time_limit))
            k = tour.index(0)
            order = [c - 1 for c in tour[k + 1 :] + tour[:k]]
            if sorted(order) != list(range(n)):
                raise RuntimeError(f"fast_tsp returned an invalid tour {tour}")
        except Exception as e:  # noqa: BLE001 - any solver failure falls back to greedy
            warnings.warn(
                f"fast_tsp failed ({e!r}); using a greedy nearest-neighbour path", stacklevel=2
            )
            order = _greedy_path(dist)
    if order[0] > order[-1]:
        order = order[::-1]
    return torch.tensor(order, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Total variation
# --------------------------------------------------------------------------------------------------


def _tv_along(t: torch.Tensor, dim: int) -> float:
    if t.shape[dim] < 2:
        return 0.0
    t = t.detach().double()
    return float(
        (t.narrow(dim, 1, t.shape[dim] - 1) - t.narrow(dim, 0, t.shape[dim] - 1)).abs().sum()
    )


def _tv_dims(t: torch.Tensor) -> tuple[int, ...]:
    if t.dim() == 0:
        return ()
    if t.dim() == 1:
        return (0,)
    return (0, 1)


def _param_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return dict(model_or_state.named_parameters())
    return {
        k: v
        for k, v in model_or_state.items()
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and k.rsplit(".", 1)[-1] not in _BN_BUFFERS
    }


def total_variation(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> float:
    """NeuMeta's total-variation metric (``compute_tv_loss_for_network`` without ``lambda_tv``).

    Sum of ``|adjacent differences|`` along dims 0 and 1 of every parameter with >= 2 dims
    (along dim 0 for 1-D parameters), divided by the number of parameters (scalars included).
    For a state dict, every floating-point entry except BN running statistics counts as a
    parameter. (The reference only handles 2-D and 4-D tensors; CifarResNet has no others.)
    """
    params = _param_dict(model_or_state)
    if not params:
        return 0.0
    total = sum(_tv_along(t, d) for t in params.values() for d in _tv_dims(t))
    return total / len(params)


def _group_pairs(params: Mapping[str, torch.Tensor], group: ChannelGroup) -> list[tuple[str, int]]:
    return sorted({(m.key, m.dim) for m in group.members if m.is_parameter and m.key in params})


def _pairs_tv(
    params: Mapping[str, torch.Tensor],
    pairs: Sequence[tuple[str, int]],
    cache: dict[tuple[str, int], float] | None = None,
) -> dict[tuple[str, int], float]:
    """Unnormalised TV of each ``(key, dim)`` along ``dim`` (whole dims), from ``cache`` if there."""
    cache = {} if cache is None else cache
    return {p: cache[p] if p in cache else _tv_along(params[p[0]], p[1]) for p in pairs}


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


@dataclass
class GroupResult:
    name: str
    size: int
    path_cost_before: float  # the SHP objective in the original order
    path_cost_after: float
    tv_before: float  # unnormalised TV of the group's member tensors along the group's dims
    tv_after: float
    accepted: bool  # False if the solver's order would not have lowered the TV (kept as is)
    order: list[int]


@dataclass
class PermutationReport:
    """What :func:`permute_for_smoothness` did (TV values as in :func:`total_variation`)."""

    tv_before: float
    tv_after: float
    groups: list[GroupResult]
    time_s: float
    time_limit: float

    @property
    def permutations(self) -> dict[str, list[int]]:
        return {g.name: list(g.order) for g in self.groups}

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def permute_for_smoothness(
    model: CifarResNet,
    groups: Sequence[ChannelGroup] | None = None,
    time_limit: float = 1.0,
) -> tuple[CifarResNet, PermutationReport]:
    """Reorder every channel group along its shortest Hamiltonian path (NeuMeta's mSHP).

    Works on a deep copy (returned with the report); the function is exactly preserved. Groups
    are processed one after another; an order is kept only if it does not raise the TV of the
    tensors the group touches (so the model TV never increases, also for option-A lineages whose
    positions interleave with other groups). ``time_limit`` is fast_tsp's budget per group.
    """
    t0 = time.perf_counter()
    model = copy.deepcopy(model)
    if groups is None:
        groups = channel_groups(model)
    params = dict(model.named_parameters())
    tv_before = total_variation(model)
    tv_cache: dict[tuple[str, int], float] = {}
    results = []
    for g in groups:
        feats = group_features(model, g)
        identity = list(range(g.size))
        cost_before = path_cost(feats)
        pairs = _group_pairs(params, g)
        tv_parts = _pairs_tv(params, pairs, tv_cache)
        gtv_before = gtv_after = sum(tv_parts.values())
        order = smoothness_order(feats, time_limit).tolist()
        cost_after = path_cost(feats, order)
        accepted = False
        if order != identity and cost_after < cost_before:
            apply_permutations(model, [g], [order])
            new_parts = _pairs_tv(params, pairs)
            if sum(new_parts.values()) <= gtv_before:
                accepted = True
                gtv_after = sum(new_parts.values())
                tv_parts = new_parts
            else:  # undo: inverse permutation
                inverse = [0] * g.size
                for i, o in enumerate(order):
                    inverse[o] = i
                apply_permutations(model, [g], [inverse])
        tv_cache.update(tv_parts)
        if not accepted:
            order, cost_after = identity, cost_before
        results.append(
            GroupResult(
                g.name, g.size, cost_before, cost_after, gtv_before, gtv_after, accepted, order
            )
        )
    report = PermutationReport(
        tv_before=tv_before,
        tv_after=total_variation(model),
        groups=results,
        time_s=time.perf_counter() - t0,
        time_limit=float(time_limit),
    )
    return model, report


def importance_orders(
    model: nn.Module, groups: Sequence[ChannelGroup] | None = None
) -> dict[str, list[int]]:
    """Hidden channels of every block sorted by descending L1 norm of their conv1 filters.

    After this function-preserving reordering, keeping the first d hidden channels of a block is
    L1 channel pruning; the anchored metamorphic variant starts from exactly that network.
    """
    groups = channel_groups(model) if groups is None else groups
    tensors = _tensors(model)
    orders = {}
    for g in groups:
        if g.kind != "hidden":
            continue
        conv1 = next(m for m in g.members if m.key.endswith("conv1.weight") and m.dim == 0)
        w = tensors[conv1.key].index_select(0, torch.tensor(conv1.positions))
        orders[g.name] = torch.argsort(
            w.abs().flatten(1).sum(1), descending=True, stable=True
        ).tolist()
    return orders
