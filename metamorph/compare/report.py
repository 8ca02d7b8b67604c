"""The comparison's outputs: one table (CSV + markdown), accuracy vs FLOPs and accuracy vs
measured latency (IQR bars), and the cost table.

One colour per method, one marker per series of a method; seen shapes filled, unseen shapes
open, networks made for their own shape (no trained range) filled. A method without points is
a table row ``missing: <why>``, never left out.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from metamorph.compare.config import CostConfig
from metamorph.compare.points import FIELDS, Point, Setting, seen_text

MARKERS = ("o", "s", "^", "D", "v", "P", "X")
TABLE_FIELDS = ["label", "status"] + FIELDS


@dataclass
class MethodResult:
    key: str
    label: str
    source: str
    points: list[Point] = field(default_factory=list)
    missing: str | None = None
    make_what: str = ""
    notes: list[str] = field(default_factory=list)
    cost: CostConfig = field(default_factory=CostConfig)
    points_file: str | None = None  # the points were read from this file
    save_to: str | None = None  # the points were evaluated and go to this file

    @property
    def storage_bytes(self) -> int | None:
        """Bytes on disk of every file the method's points come from (a model file counts with
        its weights), i.e. what must be stored to cover all its shapes."""
        files: set[Path] = set()
        for q in self.points:
            if not q.artefact:
                continue
            p = Path(q.artefact)
            files.add(p)
            if p.suffix in (".json", ".safetensors"):
                files |= {p.with_suffix(".json"), p.with_suffix(".safetensors")}
        sizes = [f.stat().st_size for f in files if f.is_file()]
        return sum(sizes) if sizes else None

    @property
    def make_s_median(self) -> float | None:
        ts = [q.make_s for q in self.points if q.make_s is not None]
        return statistics.median(ts) if ts else None


def write_table_csv(results: list[MethodResult], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=TABLE_FIELDS)
        w.writeheader()
        for r in results:
            if r.missing is not None:
                w.writerow({"method": r.key, "label": r.label, "status": f"missing: {r.missing}"})
            for q in r.points:
                w.writerow({"label": r.label, "status": "ok", **q.to_row()})


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def cost_rows(results: list[MethodResult]) -> list[dict]:
    rows = []
    for r in results:
        c = r.cost
        one = "not recorded"
        if c.one_time_hours is not None:
            one = f"{c.one_time_hours:g} h" + (f" ({c.one_time_on})" if c.one_time_on else "")
        target = []
        if r.make_s_median is not None:
            target.append(f"{r.make_s_median:.2f} s measured ({r.make_what or 'from artefact'})")
        if c.new_target_s is not None:
            what = f" ({c.new_target_what})" if c.new_target_what else ""
            target.append(f"{c.new_target_s:g} s{what}")
        size = r.storage_bytes
        rows.append(
            {
                "method": r.label,
                "one_time": one,
                "new_target": "; ".join(target) or "not recorded",
                "storage": "n/a" if size is None else f"{size / 2**20:.2f} MiB",
                "source": c.source or "",
            }
        )
    return rows


def markdown(
    results: list[MethodResult],
    setting: Setting,
    machine: dict,
    title: str,
    description: str = "",
    charts: list[str] = (),
) -> str:
    n_pts = sum(len(r.points) for r in results)
    n_missing = sum(r.missing is not None for r in results)
    lines = [f"# {title}", ""]
    if description:
        lines += [description, ""]
    lines += [
        f"Protocol `{setting.protocol}`: top-1 accuracy of the plain deployable network on all "
        f"{setting.images:,} images of {setting.data} ({setting.split} split); parameters; FLOPs of "
        f"one 32x32 image; latency median and IQR on device profile `{setting.profile}` "
        f"(machine `{setting.machine}`: {machine.get('cpu')}, {machine.get('cores')} cores, "
        f"torch {machine.get('torch')}). Every point below was measured this way.",
        "",
        f"{len(results)} methods, {n_pts} points, {n_missing} missing.",
        "",
        "| method | series | shape | seen | acc (%) | params | MFLOPs | latency (ms) | IQR (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.missing is not None:
            lines.append(f"| {r.label} | missing: {r.missing} | | | | | | | |")
        for q in r.points:
            lines.append(
                f"| {r.label} | {q.series} | `{q.descriptor}` | {seen_text(q.seen)} | "
                f"{q.acc:.2f} | {q.params:,} | {q.flops / 1e6:.2f} | {q.latency_ms:.3f} | "
                f"{q.latency_iqr_ms:.3f} |"
            )
    notes = [
        f"- {r.label}: "
        + "; ".join(r.notes + ([f"points from {r.points_file}"] if r.points_file else []))
        for r in results
        if r.notes or r.points_file
    ]
    if notes:
        lines += ["", "How the points were made:", ""] + notes
    lines += [
        "",
        "## Costs",
        "",
        "| method | one-time | time to a model for a new target | storage for all its shapes | source |",
        "|---|---|---|---|---|",
    ]
    for c in cost_rows(results):
        lines.append(
            f"| {c['method']} | {c['one_time']} | {c['new_target']} | {c['storage']} | {c['source']} |"
        )
    lines += [
        "",
        "Storage is the size on disk of the files the points come from (a Lightning checkpoint "
        "includes its optimizer state); measured times are medians over the method's points.",
    ]
    if charts:
        lines += [""] + [f"![{Path(c).stem}]({Path(c).name})" for c in charts]
    return "\n".join(lines) + "\n"


AXES = {
    "flops": ("FLOPs per image (M)", lambda q: q.flops / 1e6, lambda q: None),
    "latency": (
        "measured latency (ms, bars: IQR)",
        lambda q: q.latency_ms,
        lambda q: q.latency_iqr_ms / 2,
    ),
}


def plot(results: list[MethodResult], axis: str, path: Path, title: str = "") -> Path:
    """Accuracy vs ``axis`` (flops | latency), one colour per method, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    xlabel, xval, xerr = AXES[axis]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    any_unseen = False
    for i, r in enumerate(results):
        color = f"C{i % 10}"
        series = list(dict.fromkeys(q.series for q in r.points))
        for j, s in enumerate(series):
            # the line follows the shapes in FLOP order on both charts
            pts = sorted((q for q in r.points if q.series == s), key=lambda q: q.flops)
            name = r.label if len(series) == 1 else f"{r.label}: {s}"
            mk = MARKERS[j % len(MARKERS)]
            ax.plot([xval(q) for q in pts], [q.acc for q in pts], "-", color=color, alpha=0.5)
            for q in pts:
                open_ = q.seen is False
                any_unseen |= open_
                err = xerr(q)
                ax.errorbar(
                    [xval(q)],
                    [q.acc],
                    xerr=None if err is None else [[err], [err]],
                    fmt=mk,
                    color=color,
                    mfc="none" if open_ else color,
                    ecolor=color,
                    elinewidth=1,
                    capsize=2,
                )
            ax.plot([], [], mk + "-", color=color, label=name)
    handles, labels = ax.get_legend_handles_labels()
    if any_unseen:
        handles.append(Line2D([], [], marker="o", color="0.3", mfc="none", ls="none"))
        labels.append("open: unseen shape")
    missing = [r.label for r in results if r.missing is not None]
    if missing:
        handles.append(Line2D([], [], ls="none"))
        labels.append("missing: " + ", ".join(missing))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if handles:  # below the axes: a comparison has many series
        ax.legend(
            handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2
        )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
