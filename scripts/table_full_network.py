#!/usr/bin/env python
"""The full-network table (issue 4): metamorphic ResNets with every block metamorphic, beside the
base network, individually fine-tuned networks, a slimmable network and pruning without
fine-tuning, all on the test split, at the same shapes.

Columns: uniform compression ratios gamma = 0 / 0.25 / 0.5 (seen) and 0.625 / 0.75 (unseen), every
metamorphic block at the same gamma; 2 and 1 blocks per stage at full width; x1.25 the pretrained
width (unseen). Inputs that are not given or do not exist become cells marked "not run"; a
method that cannot make a shape (pruning and slimmable networks change widths, not depth) gets
"-". Writes to ``--out`` (default ``outputs/tables/full_network``): ``table.csv``, ``table.md``
(with the issue's targets checked per metamorphic row), ``table.png``.

Example (CPU, real data)::

    python scripts/table_full_network.py --base outputs/models/resnet20_ft.json \\
        --metamorph anchored=outputs/models/full_resnet20_anchored_cpu.ckpt \\
        --individual 0.5=outputs/models/individual/resnet20_all_l1_g0.5.json \\
                     0.75=outputs/models/individual/resnet20_all_l1_g0.75.json \\
        --slimmable outputs/models/slimmable_resnet20_all_cpu.ckpt \\
        --data-root ../shared/data/cifar10-jpeg

The last line of stdout is a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import table_neumeta as t2  # noqa: E402

from metamorph.baselines.pruning import (  # noqa: E402
    load_eval_data,
    model_batches,
    read_curve_csv,
    run_curve,
    write_curve_csv,
)
from metamorph.utils.profile import count_params  # noqa: E402

# (key, header, kind, value, seen-in-training for the metamorphic rows)
COLUMNS = [
    ("g0", "γ=0", "gamma", 0.0),
    ("g0.25", "0.25", "gamma", 0.25),
    ("g0.5", "0.5", "gamma", 0.5),
    ("g0.625", "0.625†", "gamma", 0.625),
    ("g0.75", "0.75†", "gamma", 0.75),
    ("d2", "2 blocks/stage", "depth", 2),
    ("d1", "1 block/stage", "depth", 1),
    ("x1.25", "x1.25 width†", "above", 1.25),
]
SEEN_GAMMAS = ("g0.25", "g0.5")
UNSEEN_GAMMAS = ("g0.625", "g0.75")


def metamorph_cells(label: str, path: str, dm, bs: int, k: int | None, calibrate: int = 0) -> dict:
    """Test accuracy of a metamorphic checkpoint at every column's shape; with ``calibrate`` > 0,
    of each shape's network after statistics calibration on that many training images."""
    from metamorph.export.sample import calibration_images, materialize, prepared_stats
    from metamorph.hypernet.evaluate import sweep_points
    from metamorph.tasks.metamorph_train import load_metamorph_checkpoint

    module = load_metamorph_checkpoint(path)
    net = module.net
    k = module.cfg.eval_k if k is None else k
    dm.set_normalization(net.base_arch.mean, net.base_arch.std)
    batches = list(dm.normalized_batches("test", batch_size=bs))
    gammas = [v for _, _, kind, v in COLUMNS if kind == "gamma"]
    depths = [v for _, _, kind, v in COLUMNS if kind == "depth" and v in net.spec.depth_choices]
    above = [v for _, _, kind, v in COLUMNS if kind == "above"]
    calib = calibration_images(dm, calibrate) if calibrate else None
    ref = None if calib is None else prepared_stats(net, calib)
    cells = {}
    for pt in sweep_points(net, gammas, depths, above):
        if calib is None:
            emitted = module.emit_eval(pt.hidden, k=k)
            acc = t2.accuracy(lambda x, h=pt.hidden, e=emitted: net(x, h, e), batches)
        else:
            acc = t2.accuracy(materialize(module, pt.hidden, k, 0, calib, ref), batches)
        key = pt.label.replace("depth", "d")
        cells[key] = {"acc": acc, "seen": pt.seen, "hidden": pt.hidden}
    note = f"EMA, K={k}" + (
        f", statistics calibrated on {calibrate} train images" if calib is not None else ""
    )
    return {"method": label, "source": path, "note": note, "cells": cells}


def plain_row(method: str, models: dict[str, str], dm, bs: int, note: str = "") -> dict:
    import metamorph

    cells = {}
    for key, path in models.items():
        if not t2._exists(path):
            cells[key] = {"status": "not run", "note": f"missing {path}"}
            continue
        net = metamorph.load(path).eval()
        acc = t2.accuracy(net, model_batches(dm, net, "test", bs))
        cells[key] = {"acc": acc, "params": count_params(net), "source": path}
    return {"method": method, "note": note, "cells": cells}


def slimmable_cells(args, dm) -> dict:
    from metamorph.tasks.slimmable import load_slimmable_checkpoint

    slim = load_slimmable_checkpoint(args.slimmable).net
    cells, calib = {}, []
    for key, _, kind, v in COLUMNS:
        if kind == "gamma":
            acc, params, note = t2.slimmable_at(slim, v, dm, args, calib)
            cells[key] = {"acc": acc, "params": params, "note": note}
    note = "BN recalibrated per width"
    return {"method": "Slimmable", "source": args.slimmable, "note": note, "cells": cells}


def pruning_cells(args, dm, base, out: Path) -> dict:
    dest = out / "pruning_l1.csv"
    gammas = [v for _, _, kind, v in COLUMNS if kind == "gamma"]
    if args.pruning_csv and t2._exists(args.pruning_csv):
        curve = read_curve_csv(args.pruning_csv)
    elif base is not None:
        curve = run_curve(base, dm, ["all"], gammas, ["l1"], eval_batch_size=args.batch_size)
        write_curve_csv(curve, dest)
    else:
        curve = []
    by = {t2._gkey(r["gamma"]): r["acc"] for r in curve if r["criterion"] == "l1"}
    cells = {}
    for key, _, kind, v in COLUMNS:
        if kind == "gamma" and t2._gkey(v) in by:
            cells[key] = {"acc": by[t2._gkey(v)]}
    return {"method": "L1 pruning, no fine-tuning", "note": "all blocks", "cells": cells}


def cell_text(row: dict, key: str, kind: str) -> str:
    c = row["cells"].get(key)
    if c is None:
        if row["method"] in ("Slimmable", "L1 pruning, no fine-tuning") and kind != "gamma":
            return "-"
        return "not run"
    return c.get("status", "not run") if c.get("acc") is None else f"{c['acc']:.2f}"


def _acc(row: dict | None, key: str) -> float | None:
    if row is None:
        return None
    c = row["cells"].get(key) or {}
    return c.get("acc")


def targets(meta: dict, base_acc, indiv: dict | None, slim: dict | None, prune: dict) -> list[str]:
    """Issue 4's targets for one metamorphic row, each 'met', 'not met' or 'no baseline'."""
    out = []
    g0 = _acc(meta, "g0")
    if g0 is not None and base_acc is not None:
        d = base_acc - g0
        out.append(
            f"γ=0 within 1.0 of the base: {'met' if d <= 1.0 else 'not met'} ({d:+.2f} below)"
        )
    for k in SEEN_GAMMAS:
        a, b = _acc(meta, k), _acc(indiv, k)
        if a is None:
            continue
        if b is None:
            out.append(f"{k} within 1.0 of individually fine-tuned: no baseline")
        else:
            out.append(
                f"{k} within 1.0 of individually fine-tuned: "
                f"{'met' if b - a <= 1.0 else 'not met'} ({a:.2f} vs {b:.2f})"
            )
    for k in UNSEEN_GAMMAS:
        a = _acc(meta, k)
        if a is None:
            continue
        for name, row in (("pruning", prune), ("slimmable", slim)):
            b = _acc(row, k)
            verdict = "no baseline" if b is None else ("met" if a > b else "not met")
            extra = "" if b is None else f" ({a:.2f} vs {b:.2f})"
            out.append(f"{k} above {name}: {verdict}{extra}")
    return out


def markdown(rows: list[dict], checks: dict[str, list[str]], info: dict) -> str:
    head = "| method | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = [cell_text(r, key, kind) for key, _, kind, _ in COLUMNS]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "† unseen in training (metamorphic rows). "
        f"Test split: {info['test_images']} images of `{info['data_root']}`; every metamorphic "
        "block at the same γ = 1 - d/d_full; depth columns keep the first blocks of each stage.",
    ]
    for label, items in checks.items():
        lines += ["", f"Targets, {label}:", ""] + [f"- {t}" for t in items]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    gcols = [(key, v) for key, _, kind, v in COLUMNS if kind == "gamma"]
    for i, r in enumerate(rows):
        pts = [(v, r["cells"][k]["acc"]) for k, v in gcols if _acc(r, k) is not None]
        if len(pts) > 1:
            ax.plot(*zip(*pts), "o-", color=f"C{i}", label=r["method"])
        elif pts:
            ax.plot(*zip(*pts), "o", color=f"C{i}", label=r["method"])
    ax.axvspan(0.5, 0.8, color="0.93", zorder=0)
    ax.set_xlabel(r"compression ratio $\gamma$ (every block)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Full-network metamorphosis, uniform shapes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="the fine-tuned base network (.json)")
    ap.add_argument("--metamorph", nargs="*", default=[], metavar="LABEL=CKPT")
    ap.add_argument("--k", type=int, default=None, help="K for the metamorphic rows (default 1)")
    ap.add_argument("--calibrate", type=int, default=0,
                    help="also add each metamorphic row with statistics calibration on N train images")  # fmt: skip
    ap.add_argument("--individual", nargs="*", default=[], metavar="KEY=PATH",
                    help="KEY: a gamma (0.25, 0.5, 0.625, 0.75) or d2 / d1")  # fmt: skip
    ap.add_argument("--slimmable", help="slimmable.ckpt of task=slimmable over all blocks")
    ap.add_argument("--pruning-csv", help="reuse an L1 curve CSV (blocks all)")
    t2.add_eval_args(ap)
    ap.add_argument("--out", default=str(REPO / "outputs" / "tables" / "full_network"))
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, a.threads))
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dm = load_eval_data(a.data_root, a.dataset, a.test_subset)
    k = 1 if a.k is None else a.k

    base = None
    rows: list[dict] = []
    if t2._exists(a.base):
        import metamorph

        base = metamorph.load(a.base)
        rows.append(plain_row("Base network", {"g0": a.base}, dm, a.batch_size))
    metas = []
    for label, path in t2._kv(a.metamorph, "--metamorph").items():
        if t2._exists(path):
            metas.append(metamorph_cells(label, path, dm, a.batch_size, k))
            if a.calibrate:
                metas.append(
                    metamorph_cells(
                        f"{label} + calibration", path, dm, a.batch_size, k, a.calibrate
                    )
                )
        else:
            metas.append({"method": label, "note": f"missing {path}", "cells": {}})
    rows += metas
    indiv_paths = {
        (f"g{float(key):g}" if key[0].isdigit() else key): v
        for key, v in t2._kv(a.individual, "--individual").items()
    }
    indiv = None
    if indiv_paths:
        indiv = plain_row("Individually fine-tuned", indiv_paths, dm, a.batch_size, "L1-pruned")
        rows.append(indiv)
    slim = None
    if t2._exists(a.slimmable):
        slim = slimmable_cells(a, dm)
        rows.append(slim)
    prune = pruning_cells(a, dm, base, out)
    rows.append(prune)

    base_acc = _acc(rows[0], "g0") if base is not None else None
    checks = {m["method"]: targets(m, base_acc, indiv, slim, prune) for m in metas}
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "column", "acc", "seen", "source"])
        for r in rows:
            for key, _, _, _ in COLUMNS:
                c = r["cells"].get(key)
                if c is not None and c.get("acc") is not None:
                    w.writerow(
                        [
                            r["method"],
                            key,
                            round(c["acc"], 2),
                            c.get("seen", ""),
                            r.get("source", ""),
                        ]
                    )
    info = {"test_images": len(dm.split_tensors("test")[1]), "data_root": a.data_root}
    md = markdown(rows, checks, info)
    (out / "table.md").write_text(md)
    plot(rows, out / "table.png")
    print(md)
    summary = {
        "out": str(out),
        "table": {
            f"{r['method']}@{key}": _acc(r, key) and round(_acc(r, key), 2)
            for r in rows
            for key, _, _, _ in COLUMNS
        },
        "targets": checks,
        "time_s": round(time.time() - t0, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
