"""The genetic search: per-layer bounds, directed initial population, GeneCAI's operators, and
two selection schemes over the same operators and evaluation budget:

- ``nsga2`` (abstract-faithful): pymoo NSGA-II (non-dominated sorting + crowding, binary
  tournament, elitist survival) over (-accuracy, FLOPs) with the constraint
  ``accuracy >= threshold``;
- ``scalar`` (code-faithful): GeneCAI's ``accuracy_bound_score``
  ``exp(coeff * s) / (|A0 - A| + 1 [+ exp(thr - A) if A < thr])``, ``s`` the FLOPs saving,
  fitness-proportional roulette with replacement, full generational replacement, no elitism.

Operators (both schemes): uniform crossover applied to a pair with probability ``p_cross``,
swapping each gene with probability ``p_swap`` (per gene, not the code's whole rank vectors;
parents are copied, never modified in place); mutation of a child with probability ``p_mutate``,
each gene with probability ``p_tweak``: ``rate`` genes get ``N(0, sigma)`` (clipped to their
grid), ``level`` genes step +-1 inside their valid (bounded) levels.

Every evaluated genotype is recorded once (:class:`EvalStore`); the reported front is the
non-dominated set of all feasible evaluated points.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metamorph.search.spaces import Space

ALGORITHMS = ("nsga2", "scalar")


# ------------------------------------------------------------------------------------------
# Evaluation store
# ------------------------------------------------------------------------------------------


@dataclass
class Record:
    id: int
    phase: str
    stage: str  # base | bounds | init | gen<k>
    generation: int
    genotype: tuple[float, ...]
    acc: float
    flops: int
    feasible: bool = True


class EvalStore:
    """Memoised fitness: every distinct genotype is evaluated once and recorded."""

    def __init__(
        self,
        space: Space,
        evaluate: Callable[[list[np.ndarray]], list[tuple[float, int]]],
        phase: str | None = None,
        threshold: float = -math.inf,
    ) -> None:
        self.space = space
        self.evaluate_fn = evaluate
        self.phase = phase or space.phase
        self.threshold = float(threshold)
        self.records: list[Record] = []
        self.memo: dict[tuple[float, ...], Record] = {}
        self.requests = 0

    @staticmethod
    def key(g: np.ndarray) -> tuple[float, ...]:
        return tuple(float(v) for v in g)

    def evaluate(self, X: np.ndarray, stage: str, generation: int = -1) -> np.ndarray:
        """``(n, 2)`` array of (accuracy %, FLOPs) of the (repaired) genotypes ``X``."""
        X = self.space.repair(np.atleast_2d(np.asarray(X, dtype=np.float64)))
        self.requests += len(X)
        todo, seen = [], set()
        for g in X:
            k = self.key(g)
            if k not in self.memo and k not in seen:
                seen.add(k)
                todo.append(g)
        for g, (acc, flops) in zip(todo, self.evaluate_fn(todo) if todo else []):
            rec = Record(
                len(self.records),
                self.phase,
                stage,
                generation,
                self.key(g),
                float(acc),
                int(flops),
            )
            rec.feasible = rec.acc >= self.threshold
            self.records.append(rec)
            self.memo[rec.genotype] = rec
        return np.array([[self.memo[self.key(g)].acc, self.memo[self.key(g)].flops] for g in X])

    def lookup(self, X: np.ndarray) -> np.ndarray:
        """(accuracy, FLOPs) of already evaluated genotypes (no new evaluation, not counted)."""
        recs = [self.memo[self.key(g)] for g in self.space.repair(np.atleast_2d(X))]
        return np.array([[r.acc, r.flops] for r in recs])

    def set_threshold(self, threshold: float) -> None:
        self.threshold = float(threshold)
        for r in self.records:
            r.feasible = r.acc >= self.threshold

    def write_csv(self, path: str | Path, base_flops: int | None = None) -> Path:
        path = Path(path)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(
                [
                    "id",
                    "phase",
                    "stage",
                    "generation",
                    "acc",
                    "flops",
                    "flops_ratio",
                    "feasible",
                    "genotype",
                    "decoded",
                ]
            )
            for r in self.records:
                g = np.array(r.genotype)
                ratio = "" if not base_flops else f"{r.flops / base_flops:.6f}"
                w.writerow(
                    [
                        r.id,
                        r.phase,
                        r.stage,
                        r.generation,
                        f"{r.acc:.4f}",
                        r.flops,
                        ratio,
                        int(r.feasible),
                        json.dumps([round(v, 10) for v in r.genotype]),
                        json.dumps(self.space.describe(g)),
                    ]
                )
        return path


# ------------------------------------------------------------------------------------------
# Pareto utilities and the scalar score
# ------------------------------------------------------------------------------------------


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` = (acc, flops) dominates ``b``: no worse in both, better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def non_dominated(acc, flops) -> list[int]:
    """Indices of the non-dominated points (max accuracy, min FLOPs); among exact duplicates
    the first is kept. Sorted by ascending FLOPs."""
    acc, flops = np.asarray(acc, dtype=float), np.asarray(flops, dtype=float)
    order = np.lexsort((np.arange(len(acc)), -acc, flops))  # by flops, then best acc, then index
    front, best = [], -math.inf
    for i in order:
        if acc[i] > best:
            front.append(int(i))
            best = acc[i]
    return front


def front_records(records: list[Record], feasible_only: bool = True) -> list[Record]:
    pool = [r for r in records if r.feasible or not feasible_only]
    idx = non_dominated([r.acc for r in pool], [r.flops for r in pool])
    return [pool[i] for i in idx]


def scalar_score(
    acc: np.ndarray,
    flops: np.ndarray,
    base_acc: float,
    base_flops: float,
    threshold: float,
    coeff: float = 100.0,
) -> np.ndarray:
    """GeneCAI's ``accuracy_bound_score`` (0 for candidates costlier than the base)."""
    acc, flops = np.asarray(acc, dtype=float), np.asarray(flops, dtype=float)
    saving = (base_flops - flops) / base_flops
    err = np.abs(base_acc - acc) + 1.0
    err = err + np.where(acc < threshold, np.exp(np.minimum(threshold - acc, 700.0)), 0.0)
    score = np.exp(np.minimum(coeff * saving, 700.0)) / err
    return np.where(saving < 0, 0.0, score)


# ------------------------------------------------------------------------------------------
# Bounds and directed initialisation
# ------------------------------------------------------------------------------------------


def extract_bounds(
    space: Space, store: EvalStore, min_acc: float, step: float = 0.05
) -> tuple[np.ndarray, list[dict]]:
    """One-layer-at-a-time sweeps: for each unit, the most aggressive setting that keeps the
    accuracy ``>= min_acc`` (all other layers intact). Returns the per-gene limit (the largest
    rate, or the smallest valid level) and a per-unit report. All sweep points are evaluated in
    one batch (parallel)."""
    cands = [space.sweep_candidates(u, step) for u in space.units]
    flat = [g for c in cands for g in c]
    if flat:
        store.evaluate(np.array(flat), "bounds")
    limit = space.identity()
    report = []
    for unit, cs in zip(space.units, cands):
        chosen = None
        for g in cs:  # most aggressive first
            if store.memo[store.key(g)].acc >= min_acc:
                chosen = g
                break
        if chosen is not None:
            for i in unit:
                limit[i] = chosen[i]
        report.append(
            {
                "unit": [space.genes[i].name for i in unit],
                "limit": [float(limit[i]) for i in unit],
                "evaluated": len(cs),
            }
        )
    return limit, report


def valid_levels(space: Space, limit: np.ndarray, i: int) -> np.ndarray:
    gene = space.genes[i]
    return gene.grid[gene.grid >= limit[i]] if gene.kind == "level" else gene.grid


def directed_sample(
    space: Space, limit: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """GeneCAI's directed initialisation: rates ~ N(limit/2, limit/4) (clipped), levels uniform
    over the valid levels."""
    X = np.empty((n, space.n_var))
    for i, gene in enumerate(space.genes):
        if gene.kind == "rate":
            lo = gene.grid[0]
            mu, sd = (lo + limit[i]) / 2.0, max(0.0, (limit[i] - lo) / 4.0)
            X[:, i] = np.clip(rng.normal(mu, sd, size=n) if sd > 0 else mu, lo, gene.grid[-1])
        else:
            X[:, i] = rng.choice(valid_levels(space, limit, i), size=n)
    return space.repair(X)


def initial_population(
    space: Space,
    store: EvalStore,
    limit: np.ndarray,
    n: int,
    rng: np.random.Generator,
    threshold: float,
    rejection: bool = True,
    max_rounds: int = 4,
) -> np.ndarray:
    """``n`` distinct directed samples; with ``rejection`` only those meeting the accuracy
    threshold are accepted (GeneCAI), for at most ``max_rounds`` batches of ``n`` candidates; any
    shortfall is filled with the most accurate rejected candidates."""
    accepted: list[np.ndarray] = []
    rejected: list[tuple[float, np.ndarray]] = []
    keys: set = set()
    for _ in range(max(1, max_rounds)):
        X = directed_sample(space, limit, n, rng)
        fresh = []
        for g in X:
            k = store.key(g)
            if k not in keys:
                keys.add(k)
                fresh.append(g)
        if not fresh:
            continue
        if not rejection:
            accepted += fresh
        else:
            res = store.evaluate(np.array(fresh), "init")
            for g, (acc, _) in zip(fresh, res):
                (accepted.append(g) if acc >= threshold else rejected.append((acc, g)))
        if len(accepted) >= n:
            break
    if len(accepted) < n:
        rejected.sort(key=lambda t: -t[0])
        accepted += [g for _, g in rejected[: n - len(accepted)]]
    while len(accepted) < n:  # tiny spaces: duplicates are unavoidable
        accepted.append(
            accepted[len(accepted) % max(1, len(accepted))] if accepted else space.identity()
        )
    return np.array(accepted[:n])


# ------------------------------------------------------------------------------------------
# Operators
# ------------------------------------------------------------------------------------------


def uniform_crossover(
    a: np.ndarray, b: np.ndarray, p_swap: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Two children of copies of ``a`` and ``b`` with each gene swapped with prob ``p_swap``."""
    c, d = a.copy(), b.copy()
    swap = rng.random(len(a)) < p_swap
    c[swap], d[swap] = b[swap], a[swap]
    return c, d


def mutate(
    space: Space,
    x: np.ndarray,
    limit: np.ndarray,
    p_tweak: float,
    sigma: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Per-gene mutation (see the module docstring); returns a repaired copy."""
    y = x.copy()
    hit = rng.random(len(x)) < p_tweak
    for i in np.flatnonzero(hit):
        gene = space.genes[i]
        if gene.kind == "rate":
            y[i] = np.clip(y[i] + rng.normal(0.0, sigma), gene.grid[0], gene.grid[-1])
        else:
            levels = valid_levels(space, limit, i)
            j = int(np.argmin(np.abs(levels - y[i])))
            j = int(np.clip(j + (1 if rng.random() < 0.5 else -1), 0, len(levels) - 1))
            y[i] = levels[j]
    return space.repair(y)


# ------------------------------------------------------------------------------------------
# The two algorithms
# ------------------------------------------------------------------------------------------


@dataclass
class GAConfig:
    algorithm: str = "nsga2"
    pop_size: int = 50
    generations: int = 50
    p_cross: float = 0.2
    p_swap: float = 0.2
    p_mutate: float = 0.8
    p_tweak: float = 0.05
    sigma: float = 0.2
    coeff: float = 100.0  # scalar score exponent coefficient
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"unknown search algorithm {self.algorithm!r}; choose one of {ALGORITHMS}"
            )
        if self.pop_size < 2 or self.generations < 0:
            raise ValueError("need pop_size >= 2 and generations >= 0")


@dataclass
class GAResult:
    algorithm: str
    final_population: np.ndarray
    trajectory: list[dict] = field(default_factory=list)  # best per generation
    seconds: float = 0.0


def _best_of(store: EvalStore, X: np.ndarray, threshold: float) -> dict:
    """GeneCAI's per-generation best: lowest FLOPs with acc >= thr, else the most accurate."""
    res = store.lookup(X)
    ok = np.flatnonzero(res[:, 0] >= threshold)
    if len(ok):
        i = ok[np.lexsort((-res[ok, 0], res[ok, 1]))[0]]
    else:
        i = int(np.lexsort((res[:, 1], -res[:, 0]))[0])
    return {"acc": float(res[i, 0]), "flops": int(res[i, 1]), "genotype": [float(v) for v in X[i]]}


def run_scalar(
    space: Space,
    store: EvalStore,
    X0: np.ndarray,
    limit: np.ndarray,
    cfg: GAConfig,
    base_acc: float,
    base_flops: int,
    threshold: float,
    log: Callable[[str], None] | None = None,
) -> GAResult:
    """GeneCAI's code-faithful GA (roulette on the scalar score, no elitism)."""
    t0 = time.time()
    rng = np.random.default_rng([cfg.seed, 1])
    pop = space.repair(np.asarray(X0))
    trajectory = []
    for gen in range(cfg.generations + 1):
        res = store.evaluate(pop, "init" if gen == 0 else f"gen{gen}", gen)
        best = _best_of(store, pop, threshold)
        best["generation"] = gen
        trajectory.append(best)
        if log:
            log(
                f"    [{store.phase}/scalar] gen {gen:>3}: best acc {best['acc']:.2f}% "
                f"FLOPs {best['flops'] / base_flops:.3f}x  ({len(store.records)} evaluated)"
            )
        if gen == cfg.generations:
            break
        score = scalar_score(res[:, 0], res[:, 1], base_acc, base_flops, threshold, cfg.coeff)
        w = score - score.min()
        p = w / w.sum() if w.sum() > 0 else np.full(len(pop), 1.0 / len(pop))
        children = []
        while len(children) < len(pop):
            i, j = rng.choice(len(pop), size=2, replace=True, p=p)
            a, b = pop[i].copy(), pop[j].copy()
            if rng.random() < cfg.p_cross:
                a, b = uniform_crossover(a, b, cfg.p_swap, rng)
            for c in (a, b):
                if rng.random() < cfg.p_mutate:
                    c = mutate(space, c, limit, cfg.p_tweak, cfg.sigma, rng)
                children.append(space.repair(c))
        pop = np.array(children[: len(pop)])
    return GAResult("scalar", pop, trajectory, time.time() - t0)


def run_nsga2(
    space: Space,
    store: EvalStore,
    X0: np.ndarray,
    limit: np.ndarray,
    cfg: GAConfig,
    base_flops: int,
    threshold: float,
    log: Callable[[str], None] | None = None,
) -> GAResult:
    """pymoo NSGA-II over (-accuracy, FLOPs), constraint ``threshold - accuracy <= 0``."""
    try:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.callback import Callback
        from pymoo.core.crossover import Crossover
        from pymoo.core.mutation import Mutation
        from pymoo.core.problem import Problem
        from pymoo.core.repair import Repair
        from pymoo.optimize import minimize
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "search.algorithm=nsga2 needs pymoo: pip install -e '.[search]' "
            "(or use search.algorithm=scalar)"
        ) from e

    t0 = time.time()
    xl = np.array([g.grid[0] if g.kind == "rate" else limit[i] for i, g in enumerate(space.genes)])
    xu = np.array([g.grid[-1] for g in space.genes], dtype=float)
    state = {"gen": 0}
    trajectory: list[dict] = []

    class _Problem(Problem):
        def __init__(self):
            super().__init__(n_var=space.n_var, n_obj=2, n_ieq_constr=1, xl=xl, xu=xu)

        def _evaluate(self, X, out, *args, **kwargs):
            g = state["gen"]
            res = store.evaluate(X, "init" if g == 0 else f"gen{g}", g)
            out["F"] = np.column_stack([-res[:, 0], res[:, 1].astype(float)])
            out["G"] = (threshold - res[:, 0]).reshape(-1, 1)

    class _Repair(Repair):
        def _do(self, problem, X, **kwargs):
            return space.repair(X)

    class _Crossover(Crossover):
        def __init__(self):
            super().__init__(2, 2, prob=cfg.p_cross)

        def _do(self, problem, X, *args, random_state=None, **kwargs):
            _, n_matings, n_var = X.shape
            Y = np.empty_like(X)
            for k in range(n_matings):
                Y[0, k], Y[1, k] = uniform_crossover(X[0, k], X[1, k], cfg.p_swap, random_state)
            return Y

    class _Mutation(Mutation):
        def __init__(self):
            super().__init__(prob=cfg.p_mutate)

        def _do(self, problem, X, *args, random_state=None, **kwargs):
            return np.array(
                [mutate(space, x, limit, cfg.p_tweak, cfg.sigma, random_state) for x in X]
            )

    class _Track(Callback):
        def notify(self, algorithm):
            pop = algorithm.pop.get("X")
            best = _best_of(store, pop, threshold)
            best["generation"] = state["gen"]
            trajectory.append(best)
            if log:
                log(
                    f"    [{store.phase}/nsga2] gen {state['gen']:>3}: best acc {best['acc']:.2f}% "
                    f"FLOPs {best['flops'] / base_flops:.3f}x  ({len(store.records)} evaluated)"
                )
            state["gen"] += 1

    algorithm = NSGA2(
        pop_size=cfg.pop_size,
        sampling=space.repair(np.asarray(X0)),
        crossover=_Crossover(),
        mutation=_Mutation(),
        repair=_Repair(),
        eliminate_duplicates=True,
    )
    res = minimize(
        _Problem(),
        algorithm,
        ("n_gen", cfg.generations + 1),
        seed=cfg.seed,
        callback=_Track(),
        verbose=False,
        copy_algorithm=False,
    )
    final = res.pop.get("X") if res.pop is not None else np.asarray(X0)
    return GAResult("nsga2", np.asarray(final), trajectory, time.time() - t0)
