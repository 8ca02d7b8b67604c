"""The LANA-style baseline (Molchanov et al., ECCV 2022) on Bespoke's machinery: hand-designed
alternatives for every teacher block, each trained to mimic its block, chosen by integer
programming under the measured latency budget.

The alternatives are the house's kinds ``identity`` (the block dropped, where shapes allow),
``dwsep`` (the block with both 3x3 convolutions depthwise-separable, :class:`DWSepConv`) and
``pruned`` (the block with a narrower hidden width); a LANA house is preprocessed like Bespoke's
(``experiment=bespoke/recipe/preprocess_lana_resnet56_cifar10_cpu``: one-block segments, every
candidate taken, none sampled). The selection (``metamorph-customize method=bespoke
bespoke.search=lana``) is LANA's linear proxy: each alternative's score is the change of proxy
accuracy when it alone replaces its segment in the teacher, the network's score their sum, its
latency the sum of measured table entries; :func:`milp_select` maximises the score with
``scipy.optimize.milp`` (HiGHS) under ``sum latency <= budget``, at most one alternative per
teacher block, and never a stage left without a block.

A student with depthwise-separable blocks is stored as model family ``cifar_resnet_dwsep``
(:mod:`metamorph.models.dwsep`: its ``ResNetArch`` plus the list of replaced convolutions).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from metamorph.models.dwsep import (  # noqa: F401  (re-exported: the method's names for them)
    DWSEP_FAMILY,
    DWSepConv,
    build_dwsep,
    dwsep_arch,
    dwsep_block,
    dwsep_layers,
)

# ----------------------------------------------------------------------------------------------
# The selection: an integer program
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One alternative as the integer program sees it."""

    id: str
    start: int  # teacher blocks [start, stop) it replaces
    stop: int
    delta_ms: float  # its latency minus the segment's (negative: faster)
    score: float  # its proxy score (accuracy change alone in the teacher, % points)
    blocks: int  # blocks it has (0: identity)


class InfeasibleBudget(ValueError):
    """No selection of the alternatives meets the latency budget."""


def _stage_limits(stages: Sequence[tuple[int, int]], items: Sequence[Item]):
    """Rows ``sum_j x_j * (blocks removed by j) <= stage blocks - 1`` (no stage left empty)."""
    rows, ub = [], []
    for a, b in stages:
        row = [max(0, (it.stop - it.start) - it.blocks) if a <= it.start < b else 0 for it in items]
        if sum(row) >= b - a:  # only where items could empty it
            rows.append(row)
            ub.append(b - a - 1)
    return rows, ub


def milp_select(
    items: Sequence[Item],
    base_ms: float,
    budget_ms: float,
    n_blocks: int,
    stages: Sequence[tuple[int, int]] = (),
) -> tuple[frozenset, float, float]:
    """The items maximising the summed score with ``base_ms + sum delta_ms <= budget_ms``, no two
    covering the same teacher block (the blocks not covered keep the teacher's), and no stage
    (``[a, b)`` block ranges) left without a block. Returns (ids, score, declared latency);
    :class:`InfeasibleBudget` when no selection fits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not budget_ms > 0:
        raise ValueError(f"the latency budget must be positive, got {budget_ms}")
    items = list(items)
    if not items:
        if base_ms <= budget_ms:
            return frozenset(), 0.0, base_ms
        raise InfeasibleBudget(
            f"no alternative to select and the teacher ({base_ms:.3f} ms) is over the budget "
            f"{budget_ms:.3f} ms"
        )
    n = len(items)
    c = -np.array([it.score for it in items], dtype=float)  # milp minimises
    rows = [[it.delta_ms for it in items]]
    lb, ub = [-np.inf], [budget_ms - base_ms]
    for blk in range(n_blocks):
        row = [1.0 if it.start <= blk < it.stop else 0.0 for it in items]
        if sum(row) > 1:
            rows.append(row)
            lb.append(-np.inf)
            ub.append(1.0)
    srows, sub = _stage_limits(stages, items)
    rows += srows
    lb += [-np.inf] * len(srows)
    ub += sub
    res = milp(
        c,
        constraints=LinearConstraint(np.array(rows, dtype=float), lb, ub),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
    )
    if res.status != 0 or res.x is None:
        fastest = base_ms + sum(min(0.0, it.delta_ms) for it in items)
        raise InfeasibleBudget(
            f"no selection of the {n} alternatives meets the latency budget {budget_ms:.3f} ms "
            f"(teacher {base_ms:.3f} ms declared; every saving together reaches at best "
            f"{fastest:.3f} ms, before the one-per-block and non-empty-stage limits; "
            f"solver: {res.message})"
        )
    chosen = [it for it, v in zip(items, res.x) if v > 0.5]
    return (
        frozenset(it.id for it in chosen),
        float(sum(it.score for it in chosen)),
        base_ms + sum(it.delta_ms for it in chosen),
    )


def brute_force_select(
    items: Sequence[Item],
    base_ms: float,
    budget_ms: float,
    stages: Sequence[tuple[int, int]] = (),
) -> tuple[frozenset, float] | None:
    """The same optimum by enumerating every subset (small instances only; tests)."""
    best: tuple[frozenset, float] | None = None
    for r in range(len(items) + 1):
        for combo in itertools.combinations(items, r):
            if any(
                a.start < b.stop and b.start < a.stop for a, b in itertools.combinations(combo, 2)
            ):
                continue
            if base_ms + sum(it.delta_ms for it in combo) > budget_ms + 1e-9:
                continue
            empty = False
            for a, b in stages:
                removed = sum((it.stop - it.start) - it.blocks for it in combo if a <= it.start < b)
                empty |= removed >= b - a
            if empty:
                continue
            score = sum(it.score for it in combo)
            if best is None or score > best[1] + 1e-9:
                best = (frozenset(it.id for it in combo), score)
    return best
