"""Validating a latency predictor against end-to-end measurement on seeded random shapes.

Shapes of a registered architecture (``resnet20`` ...) come in three kinds, in turn: a uniform
hidden-width ratio, independent per-block hidden widths, and per-block widths with a random depth
per stage (the CifarResNet family's ``hidden`` carries both). Each is built folded (BatchNorm in the
convolutions: the form ``metamorph-sample`` deploys) unless ``bn=True``.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path

from metamorph.devices.measure import measure_model
from metamorph.devices.predictor import LatencyPredictor
from metamorph.devices.profiles import get_profile

KINDS = ("uniform", "per_block", "per_block_depth")


def random_archs(name: str, n: int, seed: int = 0, bn: bool = False) -> list[tuple[str, object]]:
    """``n`` seeded ``(kind, ResNetArch)`` shapes of the registered architecture ``name``."""
    from metamorph.models import ResNetArch, create_model

    base = create_model(name).arch
    if not isinstance(base, ResNetArch):
        raise ValueError(
            f"arch={name} is not a CIFAR ResNet: the latency predictor's table covers "
            "BasicBlock shapes only; measure this network with metamorph-profile model=<model file>"
        )
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        a = copy.deepcopy(base)
        a.bn = bool(bn)
        r = rng.uniform(0.1, 1.0)  # the uniform kind's one width ratio
        hidden = []
        for w, stage in zip(a.stage_widths, base.hidden):
            depth = rng.randint(1, len(stage)) if kind == "per_block_depth" else len(stage)
            if kind == "uniform":
                hidden.append([max(1, round(r * w))] * depth)
            else:
                hidden.append([rng.randint(max(1, w // 8), w) for _ in range(depth)])
        a.hidden = hidden
        out.append((kind, a))
    return out


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def validate(
    profile,
    arch: str = "resnet20",
    n: int = 50,
    seed: int = 0,
    bn: bool = False,
    cache_dir=None,
    log: Callable[[str], None] | None = None,
    predictor: LatencyPredictor | None = None,
) -> dict:
    """Predicted vs measured latency of ``n`` random shapes of ``arch``: MAPE (%), Spearman
    rank correlation and one row per shape."""
    from metamorph.models.resnet_cifar import CifarResNet

    log = log or (lambda s: None)
    p = get_profile(profile)
    pred = predictor or LatencyPredictor(p, cache_dir=cache_dir, log=log)
    shapes = random_archs(arch, n, seed, bn)
    measured_entries = pred.ensure([a for _, a in shapes])
    log(
        f"  predictor: {len(pred.entries)} entries ({measured_entries} measured now) at {pred.path}"
    )
    rows = []
    for i, (kind, a) in enumerate(shapes):
        predicted = pred.predict(a)
        m = measure_model(CifarResNet(a), p)
        rows.append(
            {
                "i": i,
                "kind": kind,
                "hidden": a.hidden,
                "predicted_ms": round(predicted, 6),
                "measured_ms": round(m.latency_ms, 6),
                "measured_iqr_ms": round(m.latency.iqr_ms, 6),
                "flops": m.flops,
            }
        )
        log(
            f"  {i:>3} {kind:<16} predicted {predicted:8.3f} ms  measured {m.latency_ms:8.3f} ms "
            f"(IQR {m.latency.iqr_ms:.3f})"
        )
    pr = [r["predicted_ms"] for r in rows]
    me = [r["measured_ms"] for r in rows]
    mape = 100.0 * sum(abs(x - y) / y for x, y in zip(pr, me)) / len(rows)
    return {
        "profile": p.name,
        "arch": arch,
        "n": n,
        "seed": seed,
        "bn": bn,
        "mape_pct": round(mape, 3),
        "spearman": round(spearman(pr, me), 4) if len(rows) > 1 else None,
        "entries": len(pred.entries),
        "table": str(pred.path),
        "fingerprint": pred.fingerprint,
        "rows": rows,
    }


def plot_validation(result: dict, path: str | Path) -> Path:
    """Predicted vs measured latency (one point per shape, coloured by kind; y = x dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metamorph.io.atomic import atomic_path

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5, 5))
    for kind in KINDS:
        rs = [r for r in rows if r["kind"] == kind]
        if rs:
            ax.errorbar(
                [r["measured_ms"] for r in rs],
                [r["predicted_ms"] for r in rs],
                xerr=[r["measured_iqr_ms"] / 2 for r in rs],
                fmt="o",
                ms=4,
                label=kind.replace("_", " "),
            )
    lo = min(min(r["measured_ms"], r["predicted_ms"]) for r in rows)
    hi = max(max(r["measured_ms"], r["predicted_ms"]) for r in rows)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = measured")
    ax.set_xlabel("measured latency (ms, median; bar: IQR)")
    ax.set_ylabel("predicted latency (ms)")
    sp = result["spearman"]
    ax.set_title(
        f"{result['arch']} on {result['profile']}: MAPE {result['mape_pct']:.1f}%, "
        f"Spearman {sp if sp is None else f'{sp:.3f}'}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
