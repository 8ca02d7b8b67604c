"""The plots that answer the deployment question: accuracy against what a network costs.

:func:`plot_accuracy_vs_cost` draws accuracy against FLOPs or measured latency (interquartile
range as horizontal bars), seen and unseen shapes marked apart, baselines overlaid where their CSV
has the cost column, the cost axis from zero (one reads ratios off it: "half the FLOPs"), and a
title naming the checkpoint, the data split and K. Rows are :class:`~metamorph.export.sweep.Row`
objects or dicts with ``label, gamma, seen, acc, flops, latency_ms`` (optionally
``latency_q1_ms`` / ``latency_q3_ms``).
"""

from __future__ import annotations

from pathlib import Path

COSTS = {  # cost -> (file stem, axis label, scale)
    "flops": ("acc_vs_flops", "FLOPs per image (M)", 1e-6),
    "latency_ms": ("acc_vs_latency", "measured latency (ms, median; bars: IQR)", 1.0),
}


def _get(r, key):
    if isinstance(r, dict):
        return r.get(key)
    return getattr(r, key, None)


def count(n: int, word: str) -> str:
    """``1 thread``, ``2 threads``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def ratio_text(gamma: float) -> str:
    """A shape's size as people say it: ``gamma 0.469`` below full width, ``width x2.0`` above
    (a negative compression ratio reads as nonsense). One rounding rule: 3 decimals."""
    if gamma < -1e-9:
        w = 1.0 - gamma
        return f"width x{w:.1f}" if abs(w * 10 - round(w * 10)) < 1e-6 else f"width x{w:.3g}"
    return f"gamma {max(gamma, 0.0):.3f}"


def gamma_label(gamma: float) -> str:
    """The label of a uniform-ratio shape from its achieved ratio, rounded as :func:`ratio_text`
    rounds it (``g0.469``, not the requested ``g0.475`` whose widths round to 0.469)."""
    return f"g{round(gamma, 3):g}"


def sweep_title(src, data: str, split: str, images: int, k: int | None) -> str:
    """``<checkpoint>: <data>/<split> (<n> images), K=<k>``: what a plot was measured on."""
    p = Path(str(src))
    name = f"{p.parent.name}/{p.name}" if p.parent.name else p.name
    title = f"{name}: {data}/{split} ({images:,} images)"
    return title if k is None else f"{title}, K={k}"


def plot_accuracy_vs_cost(
    rows,
    cost: str,
    path: str | Path,
    baselines=(),
    title: str = "",
) -> Path | None:
    """Accuracy vs ``cost`` (``"flops"`` or ``"latency_ms"``); None when no row has the cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cost not in COSTS:
        raise ValueError(f"cost={cost!r}: choose one of {', '.join(COSTS)}")
    _, xlabel, scale = COSTS[cost]
    pts = [r for r in rows if _get(r, cost) is not None and _get(r, "acc") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    uni = sorted(
        (r for r in pts if str(_get(r, "label")).startswith("g")), key=lambda r: _get(r, cost)
    )
    if uni:
        ax.plot(
            [_get(r, cost) * scale for r in uni],
            [_get(r, "acc") for r in uni],
            "-",
            color="C0",
            alpha=0.5,
            label="uniform ratios",
        )
    for seen, style in ((True, dict(fmt="o", color="C0")), (False, dict(fmt="s", color="C3"))):
        group = [r for r in pts if bool(_get(r, "seen")) == seen]
        if not group:
            continue
        xs = [_get(r, cost) * scale for r in group]
        ys = [_get(r, "acc") for r in group]
        xerr = None
        if cost == "latency_ms":
            lo = [_get(r, "latency_q1_ms") for r in group]
            hi = [_get(r, "latency_q3_ms") for r in group]
            if all(v is not None for v in lo + hi):
                xerr = [
                    [max(0.0, x - q1) for x, q1 in zip(xs, lo)],
                    [max(0.0, q3 - x) for x, q3 in zip(xs, hi)],
                ]
        ax.errorbar(
            xs,
            ys,
            xerr=xerr,
            mfc="none" if not seen else None,
            capsize=3 if xerr is not None else 0,
            linestyle="none",
            label="seen in training" if seen else "unseen",
            **style,
        )
    for r in pts:
        ax.annotate(
            str(_get(r, "label")),
            (_get(r, cost) * scale, _get(r, "acc")),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    for i, b in enumerate(baselines):
        bp = sorted(
            ((x[cost] * scale, x["acc"]) for x in b.rows if cost in x and "acc" in x),
            key=lambda t: t[0],
        )
        if bp:
            ax.plot(
                [p[0] for p in bp],
                [p[1] for p in bp],
                "--x",
                color=f"C{(i + 4) % 10}",
                label=b.name,
            )
    ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
