"""Accuracy and cost of a sub-network family across compression ratios (``metamorph-eval``).

For every shape of the sweep (uniform ratios, depths, optional seeded non-uniform shapes) the
family's member is scored on a data split (a metamorphic checkpoint: its evaluation emission, EMA
and K-sample averaged; a slimmable one: each width with its recalibrated BN statistics), and the
shape's parameters, FLOPs and CPU latency are measured. Results go to ``sweep.csv``, ``sweep.md`` and four plots
(accuracy, parameters, FLOPs, latency vs gamma; seen and unseen ratios marked, the trained range
shaded, baseline curves overlaid).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from metamorph.export.plots import COSTS, plot_accuracy_vs_cost
from metamorph.export.sample import (
    check_trained_depth,
    materialize,
    reference_stats_for,
    shape_timing,
)
from metamorph.hypernet.evaluate import (
    EmittedFamily,
    SweepPoint,
    batch_accuracy,
    random_shapes,
    sweep_points,
)
from metamorph.models.subnet import as_family, as_lists

CSV_FIELDS = [
    "label",
    "gamma",
    "seen",
    "acc",
    "params",
    "flops",
    "latency_ms",
    "depth",
    "hidden",
    "latency_q1_ms",
    "latency_q3_ms",
]
METRICS = {  # metric -> (file stem, axis label, scale)
    "acc": ("acc_vs_gamma", "accuracy (%)", 1.0),
    "params": ("params_vs_gamma", "parameters (M)", 1e-6),
    "flops": ("flops_vs_gamma", "FLOPs per image (M)", 1e-6),
    "latency_ms": ("latency_vs_gamma", "CPU latency (ms)", 1.0),
}


@dataclass
class Row:
    point: SweepPoint
    flops: int | None = None
    latency_ms: float | None = None  # median; q1 / q3: its interquartile range
    latency_q1_ms: float | None = None
    latency_q3_ms: float | None = None

    label = property(lambda self: self.point.label)
    gamma = property(lambda self: self.point.gamma)
    seen = property(lambda self: self.point.seen)
    acc = property(lambda self: self.point.acc)
    params = property(lambda self: self.point.params)
    hidden = property(lambda self: self.point.hidden)
    depth = property(lambda self: self.point.depth)

    def to_dict(self) -> dict:
        d = self.point.to_dict()
        d["flops"] = self.flops
        for key in ("latency_ms", "latency_q1_ms", "latency_q3_ms"):
            v = getattr(self, key)
            d[key] = None if v is None else round(v, 4)
        if d["acc"] is not None:
            d["acc"] = round(d["acc"], 4)
        return d


@dataclass
class Baseline:
    name: str
    path: Path
    rows: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


def _split_spec(spec: str) -> tuple[str, str]:
    if "=" in spec:
        name, path = spec.split("=", 1)
    elif ":" in spec and not (os.name == "nt" and len(spec) > 2 and spec[1] == ":"):
        name, path = spec.split(":", 1)
    else:
        name, path = Path(spec).stem, spec
    if not name or not path:
        raise ValueError(f"baselines entry {spec!r} must be name=path.csv (or name:path.csv)")
    return name, path


def read_baselines(specs) -> list[Baseline]:
    """``["name=path.csv", "name:path.csv", "path.csv"]`` -> baselines; each CSV needs the
    columns ``gamma`` and ``acc`` (optionally ``params``, ``flops``, ``latency_ms``)."""
    out = []
    for spec in specs or []:
        name, path = _split_spec(str(spec))
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"baseline {name}: CSV {p} not found")
        try:
            with open(p, newline="") as fh:
                reader = csv.DictReader(fh)
                cols = set(reader.fieldnames or [])
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"baseline {name}: {p} is not a readable CSV ({e})") from e
        missing = {"gamma", "acc"} - cols
        if missing:
            raise ValueError(
                f"baseline {name}: {p} lacks the column(s) {sorted(missing)}; a baseline CSV "
                f"needs gamma,acc (optionally params,flops,latency_ms); it has {sorted(cols)}"
            )
        parsed = []
        for i, r in enumerate(rows):
            row = {}
            for key in ("gamma", "acc", "params", "flops", "latency_ms"):
                v = (r.get(key) or "").strip()
                if v == "":
                    continue
                try:
                    row[key] = float(v)
                except ValueError as e:
                    raise ValueError(
                        f"baseline {name}: row {i + 2} of {p} has {key}={v!r}, not a number"
                    ) from e
            if "gamma" in row and "acc" in row:
                parsed.append(row)
        if not parsed:
            raise ValueError(f"baseline {name}: {p} has no rows with both gamma and acc")
        out.append(Baseline(name, p, sorted(parsed, key=lambda r: r["gamma"])))
    return out


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


def run_sweep(
    module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    gammas=(),
    depths=(),
    n_random: int = 0,
    k: int | None = None,
    widths_above=(),
    seed: int = 0,
    latency: bool = True,
    latency_batch_size: int = 1,
    latency_threads: int | None = None,
    latency_min_run_time: float = 0.2,
    log=None,
    calibrate_images: torch.Tensor | None = None,
    recalibrate: bool = False,
    data=None,
) -> list[Row]:
    """Accuracy (and cost) of every sweep shape of ``module``'s family (:func:`as_family`: a
    metamorphic or slimmable checkpoint, or a width family) on ``batches``. With
    ``calibrate_images`` (normalized training images; metamorphic checkpoints), each shape's
    network is materialized and its conv channel statistics calibrated to the prepared
    network's before it is evaluated. ``recalibrate`` redoes per-member statistics a family
    stores (a slimmable network's BN statistics, computed on ``data``'s training images)."""
    family = as_family(module, k=k, seed=seed, data=data)
    for g in gammas:
        if not (isinstance(g, (int, float)) and 0.0 <= float(g) < 1.0):
            raise ValueError(
                f"sweep.gammas contains {g}; every compression ratio must be in [0, 1)"
            )
    if n_random and isinstance(family, EmittedFamily):
        custom = random_shapes(
            family.net, int(n_random), seed=seed, depth=bool(family.spec.depth_choices)
        )
    elif n_random:
        rng = np.random.default_rng(10_000 + seed)
        custom = [as_lists(family.sample(rng)) for _ in range(int(n_random))]
    else:
        custom = []
    for f in widths_above:
        if not (isinstance(f, (int, float)) and float(f) > 1.0):
            raise ValueError(
                f"sweep.widths_above contains {f}; each must be a width factor above 1 (e.g. 1.25)"
            )
    if calibrate_images is not None and not isinstance(family, EmittedFamily):
        raise ValueError(
            "sweep.calibrate calibrates an emitted network's channel statistics: it needs a "
            f"metamorphic checkpoint, not a {family.family_name} one"
        )
    pts = sweep_points(
        family,
        [float(g) for g in gammas],
        [int(d) for d in depths],
        [float(f) for f in widths_above],
        custom,
    )
    if not pts:
        raise ValueError("the sweep is empty: give sweep.gammas and/or sweep.depths")
    for p in pts:
        family.validate(p.hidden)
        if isinstance(family, EmittedFamily):  # sweep.depths on a fixed-depth checkpoint
            check_trained_depth(family.net, p.hidden)
    family.prepare([p.hidden for p in pts], recalibrate=recalibrate)
    rows = []
    ref_stats = (
        None
        if calibrate_images is None
        else reference_stats_for(module, calibrate_images, k=k, seed=seed)
    )
    for p in pts:
        if calibrate_images is None:
            p.acc = batch_accuracy(family.forward_fn(p.hidden), batches)
        else:
            model = materialize(module, p.hidden, k, seed, calibrate_images, ref_stats)
            p.acc = batch_accuracy(model.to(batches[0][0].device), batches) if batches else 0.0
        cost = family.costs(p.hidden)
        p.params = cost["params"]
        row = Row(p, flops=cost["flops"])
        if latency:
            t = shape_timing(
                family, p.hidden, latency_batch_size, latency_threads, latency_min_run_time
            )
            row.latency_ms, row.latency_q1_ms, row.latency_q3_ms = t.median_ms, t.q1_ms, t.q3_ms
        if log:
            lat = "" if row.latency_ms is None else f", {row.latency_ms:.3f} ms"
            log(
                f"  {p.label:<10} gamma {p.gamma:.3f} {'seen  ' if p.seen else 'unseen'} "
                f"acc {p.acc:6.2f}%  {p.params:,} params, {row.flops / 1e6:.2f} MFLOPs{lat}"
            )
        rows.append(row)
    return rows


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            d = r.to_dict()
            w.writerow({k: (json.dumps(d[k]) if k == "hidden" else d[k]) for k in CSV_FIELDS})


def markdown_table(rows: list[Row], header: str = "") -> str:
    lines = [header, ""] if header else []
    lines += [
        "| shape | gamma | seen | acc (%) | params | MFLOPs | latency (ms) | depth |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = "n/a" if r.latency_ms is None else f"{r.latency_ms:.3f}"
        if r.latency_q1_ms is not None and r.latency_q3_ms is not None:
            lat += f" [{r.latency_q1_ms:.3f}, {r.latency_q3_ms:.3f}]"
        lines.append(
            f"| {r.label} | {r.gamma:.3f} | {'seen' if r.seen else 'unseen'} | {r.acc:.2f} | "
            f"{r.params:,} | {r.flops / 1e6:.2f} | {lat} | {r.depth} |"
        )
    return "\n".join(lines) + "\n"


def plot_metric(
    rows: list[Row],
    metric: str,
    path: Path,
    trained: tuple[float, float] | None,
    baselines: list[Baseline] = (),
    title: str = "",
) -> Path:
    """``metric`` vs gamma: uniform ratios as a line (seen filled, unseen open), other shapes as
    annotated triangles, the trained range shaded, baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, ylabel, scale = METRICS[metric]

    def val(r):
        v = r.to_dict()[metric] if isinstance(r, Row) else r.get(metric)
        return None if v is None else v * scale

    fig, ax = plt.subplots(figsize=(6, 4))
    if trained is not None:
        ax.axvspan(trained[0], trained[1], color="0.9", label="trained range")
    uni = sorted((r for r in rows if r.label.startswith("g")), key=lambda r: r.gamma)
    uni = [r for r in uni if val(r) is not None]
    if uni:
        ax.plot([r.gamma for r in uni], [val(r) for r in uni], "-", color="C0", alpha=0.6)
        seen = [r for r in uni if r.seen]
        unseen = [r for r in uni if not r.seen]
        if seen:
            ax.plot([r.gamma for r in seen], [val(r) for r in seen], "o", color="C0", label="seen")
        if unseen:
            ax.plot(
                [r.gamma for r in unseen],
                [val(r) for r in unseen],
                "s",
                mfc="none",
                color="C3",
                label="unseen",
            )
    for r in rows:
        if not r.label.startswith("g") and val(r) is not None:
            ax.plot([r.gamma], [val(r)], "^", color="C2" if r.seen else "C3")
            ax.annotate(r.label, (r.gamma, val(r)), fontsize=7)
    for i, b in enumerate(baselines):
        pts = [(x["gamma"], x[metric] * scale) for x in b.rows if metric in x]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "--x",
                color=f"C{(i + 4) % 10}",
                label=b.name,
            )
    if metric != "acc":  # a cost axis: read as ratios ("half the FLOPs"), so from zero
        ax.set_ylim(bottom=0)
    ax.set_xlabel("compression ratio $\\gamma = 1 - d/d_{full}$")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(
    rows: list[Row],
    folder: Path,
    trained: tuple[float, float] | None,
    baselines: list[Baseline] = (),
    header: str = "",
    title: str = "",
) -> dict[str, Path]:
    """Write ``sweep.csv``, ``sweep.md`` and the plots into ``folder`` (an existing folder,
    normally a staging folder). Latency is plotted only when it was measured."""
    folder = Path(folder)
    files = {"csv": folder / "sweep.csv", "md": folder / "sweep.md"}
    write_csv(rows, files["csv"])
    files["md"].write_text(markdown_table(rows, header))
    for metric, (stem, _, _) in METRICS.items():
        if metric == "latency_ms" and all(r.latency_ms is None for r in rows):
            continue
        files[stem] = plot_metric(
            rows, metric, folder / f"{stem}.png", trained, baselines, title=title
        )
    for cost, (stem, _, _) in COSTS.items():  # the deployment question: accuracy vs cost
        png = plot_accuracy_vs_cost(rows, cost, folder / f"{stem}.png", baselines, title=title)
        if png is not None:
            files[stem] = png
    return files


def trained_gamma_range(family) -> tuple[float, float] | None:
    """The compression ratios a family saw in training (``None`` when it has no such range)."""
    return family.trained_gamma_range()
