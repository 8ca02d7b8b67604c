"""Customization with Bespoke: (preprocessed house, latency budget on a device) -> a student.

Simulated annealing (:mod:`.anneal`) searches which teacher segments to replace with which
trained alternatives; each candidate's proxy accuracy is computed on held-out training images
(the val carve-out, never the test split) incrementally, from the cached teacher activation at the
first replaced segment, and its latency is the sum of the measured table entries of its units.
The best feasible states are then assembled into plain networks and measured end to end on the
profile in score order (:func:`metamorph.devices.select_within_budget`): one measured over budget
is passed over, and if none fits, :class:`~metamorph.devices.BudgetError` says so. Nothing is
written unless a student fits. The search trace (score, accuracy, latency, temperature per step)
is written as JSON and a plot beside the model file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metamorph.config.schema import typed
from metamorph.devices import Budget, BudgetError, Option, estimate_memory, measure_model
from metamorph.devices import select_within_budget as select
from metamorph.io.atomic import atomic_path, atomic_write_text
from metamorph.io.model_file import save_model
from metamorph.methods.bespoke import lana
from metamorph.methods.bespoke.anneal import AnnealResult, Choice, anneal
from metamorph.methods.bespoke.config import SEARCHES, BespokeCustomizeConfig
from metamorph.methods.bespoke.preprocess import House
from metamorph.methods.bespoke.student import assemble, chain, declared_latency, run_from
from metamorph.runtime.customizers import register_customizer
from metamorph.utils.profile import count_flops, count_params


class ProxyEvaluator:
    """Proxy accuracy (%) of a replacement set, from the cached teacher activation at its first
    replaced segment (the teacher's blocks before it are not rerun)."""

    def __init__(self, house: House, images: int = 0, batch_size: int = 250) -> None:
        self.house = house
        self.by_id = {s.id: s for s in house.specs}
        self.labels = house.proxy.labels()
        self.n = len(self.labels) if not images else min(int(images), len(self.labels))
        self.labels = self.labels[: self.n]
        self.batch_size = batch_size
        self._h: dict[int, torch.Tensor] = {}
        self.calls = 0

    @torch.no_grad()
    def teacher_acc(self) -> float:
        n = len(self.house.teacher.blocks())
        logits = self.house.teacher(self.house.proxy.tensor(n)[: self.n], start=n)
        return 100.0 * (logits.argmax(1) == self.labels).float().mean().item()

    def replaced(self, state) -> dict:
        return {tuple(self.by_id[i].segment): (i, self.house.modules[i]) for i in sorted(state)}

    def units(self, state):
        return chain(self.house.teacher, self.replaced(state))

    @torch.no_grad()
    def __call__(self, state) -> float:
        self.calls += 1
        start = min(self.by_id[i].segment[0] for i in state)
        if start not in self._h:
            self._h[start] = self.house.proxy.tensor(start)[: self.n]
        h, units = self._h[start], self.units(state)
        correct = 0
        for i in range(0, len(h), self.batch_size):
            logits = run_from(self.house.teacher, units, h[i : i + self.batch_size], start)
            correct += (logits.argmax(1) == self.labels[i : i + self.batch_size]).sum().item()
        return 100.0 * correct / max(1, len(self.labels))


def latency_scale(house: House, calibrate: bool, measure=None, given: float | None = None) -> float:
    """The teacher's end-to-end latency measured now on the profile over its declared sum (1
    without calibration; ``given`` when set, e.g. the ratio of a median over repeated
    metamorph-profile runs, since one measurement on a loaded machine can be off by a factor):
    per-call overheads and the machine's state when the table was taken make the sum differ from
    what the final, end-to-end measurement will see."""
    if given is not None:
        if not given > 0:
            raise ValueError(f"bespoke.latency_scale={given} must be positive")
        return float(given)
    if not calibrate:
        return 1.0
    profile = house.meta.get("device") or "cpu1_b1"
    now = (measure or measure_model)(house.teacher, profile).latency_ms
    return float(now) / declared_latency(chain(house.teacher, {}), house.latency)


def fastest_of(net, profile, repeats: int):
    """The fastest of ``repeats`` end-to-end measurements (each the median of its timed blocks): on
    a shared machine other processes' load only ever adds time, and one measurement's median can
    swing by a factor of 1.5-2 (docs/results/bespoke.md)."""
    if repeats < 1:
        raise ValueError(f"bespoke.measure_repeats={repeats} must be at least 1")
    runs = [measure_model(net, profile) for _ in range(repeats)]
    return min(runs, key=lambda m: m.latency_ms)


def solo_accuracies(house: House, ev: ProxyEvaluator, ids: list[str], log=print) -> dict:
    """Proxy accuracy of each alternative alone in the teacher, cached in the house folder
    (shared by every budget's search)."""
    path = house.folder / f"solo_acc_{len(ev.labels)}.json"
    solo = json.loads(path.read_text()) if path.is_file() else {}
    todo = [i for i in ids if i not in solo]
    if todo:
        log(f"[bespoke] proxy accuracy of {len(todo)} alternatives alone in the teacher")
    for i in todo:
        solo[i] = ev(frozenset({i}))
        atomic_write_text(path, json.dumps(solo, indent=1))
    return {i: solo[i] for i in ids}


def search(house: House, budget_ms: float, cfg: BespokeCustomizeConfig, log=print):
    """Solo accuracies, then annealing; returns (result, evaluator, choices, teacher ms)."""
    teacher = house.teacher
    table = house.latency
    scale = latency_scale(house, cfg.calibrate, measure_model, cfg.latency_scale)
    base_ms = declared_latency(chain(teacher, {}), table) * scale
    choices = []
    for s in house.specs:
        if cfg.teacher_only and s.source != "teacher":
            continue
        a, b = s.segment
        seg_ms = sum(table[f"block:{i}"] for i in range(a, b))
        choices.append(Choice(s.id, a, b, (table[f"alt:{s.id}"] - seg_ms) * scale))
    if not choices:
        raise ValueError(f"the house {house.folder} has no alternative to search over")
    ev = ProxyEvaluator(house, cfg.proxy_images)
    base_acc = ev.teacher_acc()
    solo = solo_accuracies(house, ev, [c.id for c in choices], log)
    if cfg.search == "lana":
        res = lana_search(house, choices, solo, base_acc, base_ms, budget_ms, cfg.top_states)
        return res, ev, choices, base_ms, solo, scale
    a = cfg.anneal
    res = anneal(
        choices,
        ev,
        base_ms,
        budget_ms,
        solo,
        base_acc,
        a.steps,
        a.t0,
        a.alpha,
        a.penalty,
        a.seed,
        keep=cfg.top_states,
    )
    return res, ev, choices, base_ms, solo, scale


LANA_TIGHTEN = (1.0, 0.97, 0.94, 0.9, 0.86, 0.82, 0.78, 0.74)


def lana_search(
    house: House,
    choices: list[Choice],
    solo: dict[str, float],
    base_acc: float,
    base_ms: float,
    budget_ms: float,
    keep: int = 5,
) -> AnnealResult:
    """The LANA baseline's selection: :func:`.lana.milp_select` on each alternative's solo proxy
    score (accuracy change alone in the teacher), at the budget and then at tightened declared
    budgets (``LANA_TIGHTEN``), so that a state whose end-to-end measurement exceeds the budget
    has tighter runners-up. ``ranked`` holds the distinct solutions, best (loosest) first; the
    "score" is LANA's additive estimate ``teacher proxy acc + sum of solo changes``.
    :class:`~.lana.InfeasibleBudget` if none fits even at the budget itself."""
    by_id = {s.id: s for s in house.specs}
    items = [
        lana.Item(c.id, c.start, c.stop, c.delta_ms, solo[c.id] - base_acc, len(by_id[c.id].blocks))
        for c in choices
    ]
    n = len(house.teacher.blocks())
    stages, acc = [], 0
    for h in house.teacher.arch.hidden:
        stages.append((acc, acc + len(h)))
        acc += len(h)
    ranked: list[tuple[float, frozenset]] = []
    trace = []
    for k, f in enumerate(LANA_TIGHTEN):
        try:
            state, obj, lat = lana.milp_select(items, base_ms, budget_ms * f, n, stages)
        except lana.InfeasibleBudget:
            if k == 0:
                raise
            break
        score = base_acc + obj
        trace.append(
            {
                "step": k,
                "move": "milp",
                "budget_factor": f,
                "declared_budget_ms": budget_ms * f,
                "score": score,
                "latency_ms": lat,
                "feasible": lat <= budget_ms,
                "size": len(state),
            }
        )
        if state not in {s for _, s in ranked}:
            ranked.append((score, state))
        if len(ranked) >= keep:
            break
    return AnnealResult(ranked[0][1], ranked[0][0], ranked, frozenset(), trace, 0)


def plot_trace(trace: list[dict], budget_ms: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [t["step"] for t in trace]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    ax[0].plot(steps, [t["score"] for t in trace], ".", ms=3)
    ax[0].set(xlabel="step", ylabel="score (proxy acc % - penalty)")
    ax[1].plot(steps, [t["latency_ms"] for t in trace], ".", ms=3)
    ax[1].axhline(budget_ms, color="r", lw=1, label="budget")
    ax[1].set(xlabel="step", ylabel="declared latency (ms)")
    ax[1].legend()
    ax[2].plot(steps, [t["temperature"] for t in trace])
    ax[2].set(xlabel="step", ylabel="temperature", yscale="log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _no_state_error(
    res: AnnealResult, choices: list[Choice], base_ms: float, budget: Budget
) -> str:
    fastest = min((t["latency_ms"] for t in res.trace), default=base_ms)
    return (
        f"no replacement set the search visited is within budget.max_latency_ms="
        f"{budget.max_latency_ms:g} on {budget.profile.name} (teacher {base_ms:.3f} ms declared, "
        f"fastest visited {fastest:.3f} ms); raise the budget, or build a "
        "house with more or cheaper alternatives (task.house.per_segment, max_len, kinds)"
    )


@register_customizer("bespoke")
def run_bespoke(cfg: DictConfig) -> dict:
    """``metamorph-customize method=bespoke``: see the module docstring."""
    from metamorph.runtime.data import build_datamodule

    t_all = time.perf_counter()
    bcfg: BespokeCustomizeConfig = typed(BespokeCustomizeConfig, cfg.get("bespoke"), "bespoke")
    if bcfg.search not in SEARCHES:
        raise ValueError(f"bespoke.search={bcfg.search!r}: choose from {list(SEARCHES)}")
    raw_budget = OmegaConf.to_container(cfg.get("budget") or {}, resolve=True)
    budget = Budget.from_dict(
        {k: v for k, v in raw_budget.items() if v is not None} | {"device": cfg.get("device")}
    )
    if budget.max_latency_ms is None:
        raise ValueError(
            "method=bespoke searches under a measured latency: give budget.max_latency_ms "
            "(e.g. budget.max_latency_ms=3 device=cpu1_b1)"
        )
    if not bcfg.house:
        raise ValueError("bespoke.house= is required: the run folder task=bespoke_preprocess wrote")
    out = Path(str(cfg.out)) if cfg.get("out") else None
    if out is None:
        raise ValueError("out= is required: the path prefix of the model files to write")
    house = House(bcfg.house)
    if house.latency.get("_profile") != budget.profile.name:
        raise ValueError(
            f"the house's latency table is on {house.latency.get('_profile')}, the budget on "
            f"{budget.profile.name}: use device={house.latency.get('_profile')} or preprocess "
            f"again with task.device={budget.profile.name}"
        )
    print(f"[metamorph-customize] bespoke house={bcfg.house} budget: {budget.describe()}")
    profile = budget.profile
    # the search aims at what the end-to-end check accepts (the budget less its margin); when
    # every state it ranks measures over, it searches again aiming lower by the ratio of the
    # fastest one's declared to measured latency (bespoke.retries times)
    target = budget.accepted_latency_ms
    t_search = t_measure = 0.0
    retried: list[dict] = []
    for attempt in range(bcfg.retries + 1):
        t0 = time.perf_counter()
        try:
            res, ev, choices, base_ms, solo, scale = search(house, target, bcfg)
        except lana.InfeasibleBudget as e:
            raise BudgetError(f"bespoke.search=lana, budget.max_latency_ms: {e}") from None
        t_search += time.perf_counter() - t0
        if res.best is None:
            raise BudgetError(_no_state_error(res, choices, base_ms, budget))
        options = []
        for score, state in res.ranked:
            units = ev.units(state)
            net = assemble(house.teacher, units)
            o = Option(
                f"state{len(options)}",
                (state, net, units),
                params=count_params(net),
                flops=count_flops(net, (1, 3, profile.resolution, profile.resolution)),
            )
            o.score = score
            options.append(o)
        t1 = time.perf_counter()
        try:
            best = select(
                options,
                budget,
                predict=lambda o, scale=scale: declared_latency(o.item[2], house.latency) * scale,
                memory=lambda o: estimate_memory(o.item[1], profile.input_shape).peak_mb,
                measure=lambda o: fastest_of(o.item[1], profile, bcfg.measure_repeats),
                score=lambda within: None,  # scores are the annealing's
                log=print,
                what="student",
            )
            t_measure += time.perf_counter() - t1
            break
        except BudgetError:
            t_measure += time.perf_counter() - t1
            done = [o for o in options if getattr(o, "measured", None) is not None]
            if attempt == bcfg.retries or not done:
                raise
            o = min(done, key=lambda o: o.measured.latency_ms)
            target *= o.predicted_ms / o.measured.latency_ms
            retried.append(
                {
                    "declared_ms": round(o.predicted_ms, 4),
                    "measured_ms": round(o.measured.latency_ms, 4),
                    "next_target_ms": round(target, 4),
                }
            )
            print(
                f"[bespoke] every ranked state measured over the budget (fastest {o.label}: "
                f"{o.predicted_ms:.3f} ms declared, {o.measured.latency_ms:.3f} measured); "
                f"searching again aiming at {target:.3f} ms declared"
            )
    state, student, units = best.item
    replaced = sorted(
        (house.specs[[s.id for s in house.specs].index(i)] for i in state), key=lambda s: s.segment
    )
    summary: dict = {
        "method": "bespoke",
        "search": bcfg.search,
        "house": str(bcfg.house),
        "budget": budget.to_dict(),
        "teacher_declared_ms": round(base_ms, 4),
        "latency_scale": round(scale, 4),
        "teacher_only": bcfg.teacher_only,
        "replacements": [s.id for s in replaced],
        "kinds": sorted({s.kind for s in replaced}),
        "hidden": student.arch.hidden,
        "params": best.params,
        "flops": best.flops,
        "proxy_acc": round(ev(state), 2),
        "score": round(best.score, 3),
        "declared_latency_ms": round(best.predicted_ms, 4),
        "measured_latency_ms": round(best.measured.latency_ms, 4),
        "measured_latency_iqr_ms": round(best.measured.latency.iqr_ms, 4),
        "greedy_start": sorted(res.greedy),
        "evaluations": ev.calls,
        "retried": retried,
        "search_s": round(t_search, 2),
        "measure_s": round(t_measure, 2),
    }
    if bcfg.eval_test:
        from metamorph.models.metrics import top1

        dm = build_datamodule(cfg.data, seed=int(cfg.seed))
        dm.setup("test")
        dm.set_normalization(student.arch.mean, student.arch.std)
        with torch.no_grad():
            summary["test_acc_before_retrain"] = round(
                top1(student.eval(), dm.normalized_batches("test")), 2
            )
        summary["test_images"] = int(len(dm.split_tensors("test")[1]))
    summary["wall_s"] = round(time.perf_counter() - t_all, 2)
    out.parent.mkdir(parents=True, exist_ok=True)  # only now: a failed run writes nothing
    meta = {"bespoke": {k: v for k, v in summary.items() if k != "hidden"}}
    summary["model_file"] = str(save_model(student, out, meta=meta))
    trace = out.with_name(out.name + ".trace.json")
    atomic_write_text(
        trace,
        json.dumps(
            {"budget_ms": budget.max_latency_ms, "trace": res.trace, "solo_acc": solo}, indent=1
        ),
    )
    summary["trace"] = str(trace)
    if bcfg.search == "anneal":
        summary["trace_plot"] = str(
            plot_trace(res.trace, budget.max_latency_ms, out.with_name(out.name + ".trace.png"))
        )
    if bcfg.onnx:
        from metamorph.methods.bespoke.task import write_onnx

        summary["onnx"] = write_onnx(student, out.with_name(out.name + ".onnx"))
    report = out.with_name(out.name + ".customize.json")
    atomic_write_text(
        report,
        json.dumps({**summary, "options": [o.to_dict() for o in options]}, indent=1, default=str),
    )
    summary["report"] = str(report)
    print(
        f"[metamorph-customize] bespoke: {len(replaced)} replacements, measured "
        f"{summary['measured_latency_ms']} ms (declared {summary['declared_latency_ms']}), "
        f"proxy acc {summary['proxy_acc']}%; search {t_search:.1f} s"
    )
    return summary
