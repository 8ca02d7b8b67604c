"""Simulated annealing over non-overlapping segment replacements.

A state is a set of alternatives whose teacher segments do not overlap. Moves: add one
alternative (disjoint from the state), remove one, or swap (put one in and take out every member
it overlaps). Score = proxy accuracy (%) minus ``penalty * 100 * max(0, latency / budget - 1)``;
latency is the sum of measured table entries. The start is greedy: alternatives in order of
accuracy lost per millisecond saved (each measured alone in the teacher) until the budget is met;
where that cannot meet it, the largest savings first.
Accepted with probability ``exp(delta / T)``, ``T`` cooled geometrically. The best *feasible*
state (latency within the budget) is kept, plus the runners-up, so the caller can measure them
end to end in order; an infeasible state is never reported as feasible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Choice:
    id: str
    start: int
    stop: int
    delta_ms: float  # alternative latency minus the teacher segment's (negative: faster)

    def overlaps(self, other: Choice) -> bool:
        return self.start < other.stop and other.start < self.stop


@dataclass
class AnnealResult:
    best: frozenset | None  # the best feasible state (ids), None if none was seen
    best_score: float | None
    ranked: list[tuple[float, frozenset]]  # feasible states seen, best first
    greedy: frozenset
    trace: list[dict] = field(default_factory=list)
    evaluations: int = 0


def anneal(
    choices: list[Choice],
    accuracy: Callable[[frozenset], float],
    base_ms: float,
    budget_ms: float,
    solo_acc: dict[str, float],
    base_acc: float,
    steps: int = 150,
    t0: float = 1.0,
    alpha: float = 0.97,
    penalty: float = 2.0,
    seed: int = 0,
    keep: int = 5,
) -> AnnealResult:
    """Search the replacement set; ``accuracy(state)`` is the proxy accuracy (%) of the student,
    ``base_ms`` the teacher's declared latency, ``solo_acc[id]`` the proxy accuracy with only
    that alternative in, ``base_acc`` the teacher's."""
    if not budget_ms > 0:
        raise ValueError(f"the latency budget must be positive, got {budget_ms}")
    if not 0 < alpha < 1 or t0 <= 0 or steps < 0:
        raise ValueError("anneal needs 0 < alpha < 1, t0 > 0 and steps >= 0")
    by_id = {c.id: c for c in choices}
    rng = random.Random(seed)
    memo: dict[frozenset, float] = {}

    def latency(state: frozenset) -> float:
        return base_ms + sum(by_id[i].delta_ms for i in state)

    def acc(state: frozenset) -> float:
        if state not in memo:
            memo[state] = base_acc if not state else float(accuracy(state))
        return memo[state]

    def score(state: frozenset) -> tuple[float, float, float]:
        a, lat = acc(state), latency(state)
        return a - penalty * 100.0 * max(0.0, lat / budget_ms - 1.0), a, lat

    # greedy start: least accuracy lost per ms saved first
    gain = [c for c in choices if c.delta_ms < 0]
    gain.sort(key=lambda c: ((base_acc - solo_acc.get(c.id, 0.0)) / -c.delta_ms, c.id))

    def fill(order: list[Choice]) -> frozenset:
        state: frozenset = frozenset()
        for c in order:
            if latency(state) <= budget_ms:
                break
            if all(not c.overlaps(by_id[i]) for i in state):
                state = state | {c.id}
        return state

    state = fill(gain)
    if latency(state) > budget_ms:
        # a tight budget: the cheapest-per-ms replacements fill the network before it is fast
        # enough; fall back to the largest savings first (feasible whenever that reaches it)
        by_saving = fill(sorted(gain, key=lambda c: (c.delta_ms, c.id)))
        if latency(by_saving) < latency(state):
            state = by_saving
    greedy = state
    feasible: dict[frozenset, float] = {}

    def note(s: frozenset, sc: float, lat: float) -> None:
        if lat <= budget_ms:
            feasible[s] = sc

    cur, (cur_s, cur_a, cur_l) = state, score(state)
    note(cur, cur_s, cur_l)
    trace = [
        {
            "step": 0,
            "move": "greedy",
            "score": cur_s,
            "acc": cur_a,
            "latency_ms": cur_l,
            "temperature": t0,
            "accepted": True,
            "feasible": cur_l <= budget_ms,
            "size": len(cur),
        }
    ]
    t = t0
    for step in range(1, steps + 1):
        cand, move = _neighbour(cur, choices, by_id, rng)
        if cand is None:
            break
        s, a, lat = score(cand)
        note(cand, s, lat)
        d = s - cur_s
        accepted = d > 0 or rng.random() < math.exp(d / t)
        if accepted:
            cur, cur_s = cand, s
        trace.append(
            {
                "step": step,
                "move": move,
                "score": s,
                "acc": a,
                "latency_ms": lat,
                "temperature": t,
                "accepted": accepted,
                "feasible": lat <= budget_ms,
                "size": len(cand),
            }
        )
        t *= alpha
    ranked = sorted(((sc, st) for st, sc in feasible.items()), key=lambda p: (-p[0], sorted(p[1])))
    best = ranked[0] if ranked else (None, None)
    return AnnealResult(best[1], best[0], ranked[:keep], greedy, trace, len(memo))


def _neighbour(cur: frozenset, choices: list[Choice], by_id: dict, rng: random.Random):
    members = [by_id[i] for i in sorted(cur)]
    addable = [c for c in choices if c.id not in cur and all(not c.overlaps(m) for m in members)]
    swappable = [c for c in choices if c.id not in cur and any(c.overlaps(m) for m in members)]
    moves = [m for m, ok in (("add", addable), ("remove", members), ("swap", swappable)) if ok]
    if not moves:
        return None, None
    move = rng.choice(moves)
    if move == "add":
        return cur | {rng.choice(addable).id}, move
    if move == "remove":
        return cur - {rng.choice(members).id}, move
    c = rng.choice(swappable)
    return frozenset({m.id for m in members if not c.overlaps(m)} | {c.id}), move
