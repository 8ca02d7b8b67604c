"""GeneCAI's pipeline: decomposition search -> fine-tune -> pruning search -> fine-tune of chosen
front points, plus a uniform-L1 pruning baseline at matching FLOPs; or a single search over the
shapes of a metamorphic checkpoint. Writes CSVs, models and a plot; returns a summary dict."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metamorph.models import metrics
from metamorph.runtime.search_methods import get_search_method
from metamorph.search.config import SearchConfig
from metamorph.search.evaluate import (
    Evaluator,
    PopulationEvaluator,
    top1,
)
from metamorph.search.finetune import finetune
from metamorph.search.flops import model_flops
from metamorph.search.ga import (
    EvalStore,
    GAConfig,
    GAResult,
    Record,
    extract_bounds,
    front_records,
    initial_population,
    run_nsga2,
    run_scalar,
)
from metamorph.search.lowrank import save_compressed
from metamorph.search.prune import channel_order, channel_saliency, prune_physical
from metamorph.search.spaces import (
    PruningSpace,
    Space,
    uniform_rate_genotype,
)

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------
# One search phase
# ------------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    phase: str
    algorithm: str
    base_acc: float
    base_flops: int
    threshold: float
    limit: np.ndarray
    bounds: list[dict]
    store: EvalStore
    ga: GAResult
    front: list[Record]
    seconds: float
    evaluations: dict = field(default_factory=dict)

    @property
    def space(self) -> Space:
        return self.store.space


def search_phase(
    space: Space,
    evaluator: Evaluator,
    cfg: SearchConfig,
    acc_drop: float,
    seed: int = 0,
    log: Log = print,
    workdir: str | Path | None = None,
) -> PhaseResult:
    """Bounds -> directed initial population -> NSGA-II or the scalar GA; every evaluation kept."""
    t0 = time.time()
    ga = GAConfig(
        algorithm=cfg.algorithm,
        pop_size=cfg.pop_size,
        generations=cfg.generations,
        seed=seed,
        **asdict(cfg.operators),
    )
    with PopulationEvaluator(evaluator, cfg.n_jobs, cfg.threads_per_worker, workdir) as pe:
        store = EvalStore(space, pe)
        base_acc, base_flops = store.evaluate(space.identity(), "base")[0]
        base_flops = int(base_flops)
        threshold = base_acc - acc_drop
        store.set_threshold(threshold)
        log(
            f"  [{space.phase}] {space.n_var} genes; base {base_acc:.2f}% at "
            f"{base_flops / 1e6:.2f} MFLOPs; constraint acc >= {threshold:.2f}%"
        )
        limit, bounds = extract_bounds(space, store, base_acc - cfg.bound_drop, cfg.bound_step)
        n_bounds = len(store.records) - 1
        log(f"  [{space.phase}] per-layer bounds from {n_bounds} one-layer sweeps")
        rng = np.random.default_rng([seed, 0])
        X0 = initial_population(
            space, store, limit, cfg.pop_size, rng, threshold, cfg.init_rejection, cfg.init_rounds
        )
        n_init = len(store.records) - 1 - n_bounds
        if cfg.algorithm == "nsga2":
            res = run_nsga2(space, store, X0, limit, ga, base_flops, threshold, log)
        else:
            res = run_scalar(space, store, X0, limit, ga, base_acc, base_flops, threshold, log)
    front = front_records(store.records)
    return PhaseResult(
        phase=space.phase,
        algorithm=cfg.algorithm,
        base_acc=float(base_acc),
        base_flops=base_flops,
        threshold=float(threshold),
        limit=limit,
        bounds=bounds,
        store=store,
        ga=res,
        front=front,
        seconds=time.time() - t0,
        evaluations={
            "total": len(store.records),
            "bounds": n_bounds,
            "init": n_init,
            "search": len(store.records) - 1 - n_bounds - n_init,
            "requests": store.requests,
        },
    )


def pick_carry(result: PhaseResult, how: str) -> Record:
    """The point carried to the next phase: GeneCAI's best (lowest FLOPs meeting the threshold)
    or the most accurate compressed one."""
    cands = [r for r in result.front if r.flops < result.base_flops] or result.front
    if how == "max_acc":
        return max(cands, key=lambda r: (r.acc, -r.flops))
    return min(cands, key=lambda r: (r.flops, -r.acc))


def pick_final(
    result: PhaseResult, points: int, ratios: list[float], ref_flops: int
) -> list[Record]:
    """Front points to fine-tune: the most accurate under each FLOPs ratio (of ``ref_flops``), or
    ``points`` points spread evenly along the front (compressed points only)."""
    front = [r for r in result.front if r.flops < result.base_flops] or list(result.front)
    if ratios:
        from metamorph.devices import Budget, BudgetError, Option, select_within_budget

        def by_acc(options: list[Option]) -> None:
            for o in options:
                o.score = o.item.acc

        out = []
        for q in ratios:  # a FLOPs budget per ratio: the most accurate point (ties: fewer FLOPs)
            if q * ref_flops < 1:
                continue
            options = [Option(str(i), r, flops=r.flops) for i, r in enumerate(front)]
            try:
                best = select_within_budget(
                    options, Budget(max_flops=math.floor(q * ref_flops)), score=by_acc
                ).item
            except BudgetError:
                continue
            if best not in out:
                out.append(best)
        return out
    if not front or points <= 0:
        return []
    idx = sorted({int(round(v)) for v in np.linspace(0, len(front) - 1, min(points, len(front)))})
    return [front[i] for i in idx]


# ------------------------------------------------------------------------------------------
# Helpers: data, accuracy, baseline, outputs
# ------------------------------------------------------------------------------------------


def search_set(dm, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized ``(images, labels)`` of ``n`` seeded images of a training-data split."""
    if split not in ("val", "train"):
        raise ValueError("the search set must come from the training data (val or train)")
    x, y = dm.subset(split, n, seed=seed)
    if len(y) == 0:
        raise ValueError(
            f"the {split} split is empty: set data.val_size > 0 (the search set is carved from train)"
        )
    return dm.transform_batch(x), y


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def accuracy_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 (%) of ``model`` on ``(x, y)``, run where the model lives."""
    model.eval()
    return top1(model, x, y, batch_size, _device_of(model))


@torch.no_grad()
def test_accuracy(model: nn.Module, dm) -> float:
    """Top-1 (%) on the test split (reporting only), run where the model lives."""
    model.eval()
    return metrics.top1(model, dm.normalized_batches("test"), _device_of(model))


def uniform_l1_baseline(
    model: nn.Module, target_flops: int, criterion: str = "l1", x=None, y=None
) -> tuple[nn.Module, float, bool]:
    """Uniform pruning rate (same in every block, ``criterion`` order) with the largest FLOPs
    ``<= target_flops`` (the smallest such rate); returns (pruned net, rate, target reached)."""
    order = channel_order(channel_saliency(model, x, y, criterion))
    space = PruningSpace(model, order)
    grid = sorted({float(v) for g in space.genes for v in g.grid})
    chosen, reached = grid[-1], False
    for rate in grid:  # ascending rates -> descending FLOPs
        if space.flops(uniform_rate_genotype(space, rate)) <= target_flops:
            chosen, reached = rate, True
            break
    g = uniform_rate_genotype(space, chosen)
    return prune_physical(model, space.keep(g)).eval(), chosen, reached


def write_front_csv(path: Path, result: PhaseResult, ref_flops: int) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "phase", "acc", "flops", "flops_ratio", "genotype", "decoded"])
        for r in result.front:
            w.writerow(
                [
                    r.id,
                    r.phase,
                    f"{r.acc:.4f}",
                    r.flops,
                    f"{r.flops / ref_flops:.6f}",
                    json.dumps(list(r.genotype)),
                    json.dumps(result.space.describe(np.array(r.genotype))),
                ]
            )


def write_rows(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()}
            )


def plot_results(
    path: Path,
    phases: list[PhaseResult],
    base: dict,
    finals: list[dict],
    baselines: list[dict],
    title: str = "",
) -> Path:
    """Search-set accuracy vs MFLOPs: all evaluated points per phase, each phase's front, the
    base network, the fine-tuned front models and the uniform-L1 baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    colors = {"decompose": "tab:orange", "prune": "tab:green", "metamorph": "tab:purple"}
    for pr in phases:
        c = colors.get(pr.phase, "tab:gray")
        recs = pr.store.records
        ax.scatter(
            [r.flops / 1e6 for r in recs],
            [r.acc for r in recs],
            s=6,
            alpha=0.25,
            color=c,
            label=f"{pr.phase}: all evaluated ({len(recs)})",
        )
        ax.plot(
            [r.flops / 1e6 for r in pr.front],
            [r.acc for r in pr.front],
            "-o",
            ms=3,
            color=c,
            label=f"{pr.phase}: front ({len(pr.front)})",
        )
    ax.scatter(
        [base["flops"] / 1e6],
        [base["acc"]],
        marker="*",
        s=180,
        color="black",
        zorder=5,
        label="base network",
    )
    if finals:
        ax.scatter(
            [f["flops"] / 1e6 for f in finals],
            [f["search_acc_ft"] for f in finals],
            marker="D",
            s=50,
            color="tab:red",
            zorder=6,
            label="front points"
            + (", fine-tuned" if any(f["finetune_steps"] for f in finals) else ""),
        )
    if baselines:
        ax.scatter(
            [b["flops"] / 1e6 for b in baselines],
            [b["search_acc_ft"] for b in baselines],
            marker="x",
            s=60,
            color="tab:blue",
            zorder=6,
            label=(
                "uniform ratio of the checkpoint"
                if baselines[0].get("kind") == "uniform_gamma"
                else "uniform L1 pruning"
            )
            + (", fine-tuned" if any(b["finetune_steps"] for b in baselines) else ""),
        )
    ax.set_xlabel("MFLOPs (forward, one 32x32 image; multiply-add = 2)")
    ax.set_ylabel("search-set accuracy (%)")
    ax.set_title(title or "accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def baseline_row(
    net: nn.Module,
    j: int,
    *,
    matches: str,
    kind: str,
    rate: float,
    reached: bool,
    search: tuple[torch.Tensor, torch.Tensor, int],
    dm,
    finetune_cfg,
    seed: int,
    base_flops: int,
    report_test: bool,
    device: torch.device,
) -> tuple[nn.Module, dict]:
    """Search-set accuracy, optional fine-tuning (seed ``seed + 200 + j``) and test accuracy of
    the ``j``-th baseline network, as one row of ``baseline.csv`` (the network on ``device``)."""
    xs, ys, bs = search
    net = net.to(device)
    acc_before = accuracy_on(net, xs, ys, bs)
    ft = (
        finetune(net, dm, finetune_cfg, seed + 200 + j)
        if finetune_cfg is not None
        else {"steps": 0}
    )
    flops = model_flops(net)
    row = {
        "name": f"baseline_{j}",
        "kind": kind,
        "matches": matches,
        "rate": round(rate, 6),
        "target_reached": reached,
        "flops": flops,
        "flops_ratio": round(flops / base_flops, 6),
        "params": sum(p.numel() for p in net.parameters()),
        "search_acc": round(acc_before, 4),
        "search_acc_ft": round(accuracy_on(net, xs, ys, bs), 4),
        "finetune_steps": ft["steps"],
    }
    if report_test:
        row["test_acc"] = round(test_accuracy(net, dm), 4)
    return net, row


def uniform_gamma_baseline(
    module, target_flops: int, k: int = 1, seed: int = 0, step: float = 1 / 64
) -> tuple[nn.Module, float, bool]:
    """The metamorphic checkpoint's own uniform shape (every metamorphic block at ratio gamma,
    full depth) with the largest FLOPs ``<= target_flops``, emitted as a plain network; returns
    (network, gamma, target reached)."""
    from metamorph.export.sample import materialize, shape_flops

    net = module.net
    gammas = np.arange(0.0, 1.0, step)
    chosen, reached = float(gammas[-1]), False
    for g in gammas:  # ascending ratios -> descending FLOPs
        if shape_flops(net, net.shape_for_gamma(float(g))) <= target_flops:
            chosen, reached = float(g), True
            break
    return materialize(module, net.shape_for_gamma(chosen), k=k, seed=seed), chosen, reached


# ------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------


def _latency(model: nn.Module, cfg: SearchConfig) -> float | None:
    """Median latency (ms) on the device profile ``final.device`` (metamorph.devices)."""
    if not cfg.final.latency:
        return None
    from metamorph.devices import measure_model

    return round(measure_model(model, cfg.final.device).latency_ms, 4)


def run_pipeline(
    cfg: SearchConfig,
    dm,
    out_dir: str | Path,
    source,
    seed: int = 0,
    log: Log = print,
    device: str | torch.device = "cpu",
) -> dict:
    """Run the search method ``cfg.method`` (a registered :mod:`~metamorph.search.methods`
    entry) on ``source`` (what its ``load_source`` returned), then fine-tune the chosen front
    points, build the baselines and write CSVs, models and the plot. ``dm`` is a set-up
    :class:`~metamorph.data.CIFARDataModule` normalised like the network. Candidate evaluation,
    fine-tuning and test accuracy run on ``device``; saliency, FLOPs, latency and the saved model
    files stay on the CPU."""
    from metamorph.search.methods import SearchContext

    t0 = time.time()
    device = torch.device(device)
    out = Path(out_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    xs, ys = search_set(dm, cfg.search_split, cfg.search_images, seed)
    log(
        f"[metamorph-search] {cfg.method} / {cfg.algorithm}: {len(ys)} search images "
        f"({cfg.search_split} split, from the training data)"
    )
    if cfg.search_split == "train":
        log("  warning: the search set is drawn from the train split, which fine-tuning also uses")
    bs = cfg.eval_batch_size
    summary: dict = {"method": cfg.method, "algorithm": cfg.algorithm, "search_images": len(ys)}
    ctx = SearchContext(dm, xs, ys, bs, seed, log, device)
    outcome = get_search_method(cfg.method).run_phases(source, cfg, ctx)
    phases, builder, ref_model, carried = (
        outcome.phases,
        outcome.builder,
        outcome.ref_model,
        outcome.carried,
    )
    metamorph_module = source.module

    # ---------------------------------------------------------------- base and CSVs
    base_flops = model_flops(ref_model)
    ref_model.to(device)
    base = {
        "acc": accuracy_on(ref_model, xs, ys, bs),
        "flops": base_flops,
        "params": sum(p.numel() for p in ref_model.parameters()),
    }
    if cfg.final.report_test:
        base["test_acc"] = test_accuracy(ref_model, dm)
    ref_model.cpu()
    base["latency_ms"] = _latency(ref_model, cfg)
    files: dict = {}
    for pr in phases:
        files[f"evaluations_{pr.phase}"] = str(
            pr.store.write_csv(out / f"evaluations_{pr.phase}.csv", base_flops)
        )
        write_front_csv(out / f"front_{pr.phase}.csv", pr, base_flops)
        files[f"front_{pr.phase}"] = str(out / f"front_{pr.phase}.csv")

    # ---------------------------------------------------------------- final front models
    last = phases[-1]
    chosen = pick_final(last, cfg.final.points, cfg.final.flops_ratios, base_flops)
    finals: list[dict] = []
    for j, rec in enumerate(chosen):
        g = np.array(rec.genotype)
        net = builder(g).to(device)
        ft = finetune(net, dm, cfg.finetune, seed + 100 + j) if cfg.final.finetune else {"steps": 0}
        flops = model_flops(net)
        row = {
            "name": f"front_{j}",
            "phase": last.phase,
            "record_id": rec.id,
            "flops": flops,
            "flops_ratio": round(flops / base_flops, 6),
            "params": sum(p.numel() for p in net.parameters()),
            "search_acc": round(rec.acc, 4),
            "search_acc_ft": round(accuracy_on(net, xs, ys, bs), 4),
            "finetune_steps": ft["steps"],
        }
        if cfg.final.report_test:
            row["test_acc"] = round(test_accuracy(net, dm), 4)
        net = net.cpu()
        row["latency_ms"] = _latency(net, cfg)
        meta = {
            "source": "metamorph-search",
            "method": cfg.method,
            "algorithm": cfg.algorithm,
            "phase": last.phase,
            "genotype": list(rec.genotype),
            "decoded": last.space.describe(g),
            "carried": carried,
            **{k: row[k] for k in ("flops", "search_acc", "search_acc_ft")},
        }
        row["model_file"] = str(save_compressed(net, out / "models" / row["name"], meta=meta))
        row["decoded"] = last.space.describe(g)
        finals.append(row)
        log(
            f"  {row['name']}: {flops / 1e6:.2f} MFLOPs ({row['flops_ratio']:.3f}x), search acc "
            f"{row['search_acc']:.2f}% -> {row['search_acc_ft']:.2f}% fine-tuned"
            + (f", test {row['test_acc']:.2f}%" if "test_acc" in row else "")
        )

    # ---------------------------------------------------------------- baseline
    baselines: list[dict] = []
    if cfg.baseline.enabled:
        for j, f in enumerate(finals):
            if cfg.baseline.kind == "uniform_gamma":
                net, rate, reached = uniform_gamma_baseline(
                    metamorph_module, f["flops"], cfg.metamorph.k, cfg.metamorph.seed
                )
            else:
                net, rate, reached = uniform_l1_baseline(
                    ref_model, f["flops"], cfg.baseline.criterion, xs, ys
                )
            net, row = baseline_row(
                net,
                j,
                matches=f["name"],
                kind=cfg.baseline.kind,
                rate=rate,
                reached=reached,
                search=(xs, ys, bs),
                dm=dm,
                finetune_cfg=cfg.finetune if cfg.final.finetune else None,
                seed=seed,
                base_flops=base_flops,
                report_test=cfg.final.report_test,
                device=device,
            )
            net = net.cpu()
            row["latency_ms"] = _latency(net, cfg)
            row["model_file"] = str(
                save_compressed(
                    net,
                    out / "models" / row["name"],
                    meta={"source": cfg.baseline.kind.replace("_", "-"), **row},
                )
            )
            baselines.append(row)

    write_rows(out / "front.csv", finals)
    write_rows(out / "baseline.csv", baselines)
    files["front"] = str(out / "front.csv")
    if baselines:
        files["baseline"] = str(out / "baseline.csv")
    files["plot"] = str(
        plot_results(
            out / "accuracy_vs_flops.png",
            phases,
            base,
            finals,
            baselines,
            title=f"{cfg.method} ({cfg.algorithm}), {len(ys)} search images",
        )
    )
    summary.update(
        base={k: (round(v, 4) if isinstance(v, float) else v) for k, v in base.items()},
        phases=[
            {
                "phase": pr.phase,
                "base_acc": round(pr.base_acc, 4),
                "threshold": round(pr.threshold, 4),
                "evaluations": pr.evaluations,
                "front_size": len(pr.front),
                "seconds": round(pr.seconds, 2),
            }
            for pr in phases
        ],
        carried=[{k: v for k, v in c.items() if k != "decoded"} for c in carried],
        front=[{k: v for k, v in f.items() if k != "decoded"} for f in finals],
        baseline=baselines,
        files=files,
        time_s=round(time.time() - t0, 1),
    )
    return summary


def format_table(summary: dict) -> str:
    """A readable table of the base, the fine-tuned front models and the baseline."""
    test = any("test_acc" in r for r in summary.get("front", []))
    head = f"  {'model':<12} | {'MFLOPs':>8} | {'ratio':>6} | {'search %':>8} | {'search FT %':>11}"
    head += f" | {'test %':>7}" if test else ""
    lines = [head, "  " + "-" * (len(head) - 2)]
    b = summary["base"]
    row = f"  {'base':<12} | {b['flops'] / 1e6:8.2f} | {1.0:6.3f} | {b['acc']:8.2f} | {'-':>11}"
    lines.append(row + (f" | {b.get('test_acc', math.nan):7.2f}" if test else ""))
    for r in summary.get("front", []) + summary.get("baseline", []):
        row = (
            f"  {r['name']:<12} | {r['flops'] / 1e6:8.2f} | {r['flops_ratio']:6.3f} | "
            f"{r.get('search_acc', math.nan):8.2f} | {r['search_acc_ft']:11.2f}"
        )
        lines.append(row + (f" | {r.get('test_acc', math.nan):7.2f}" if test else ""))
    return "\n".join(lines)
