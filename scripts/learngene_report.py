"""Learngene Pool vs SN-Net: the descendant tables, the paper's three claims and the
accuracy-vs-FLOPs plot, from the tables ``task=learngene_stitch`` wrote.

    python scripts/learngene_report.py [--models outputs/models/learngene] [--plot docs/results/learngene_acc_flops.png]

Prints markdown tables (every evaluated descendant of every system; stored parameters) and the
three claims, each with the measured number, then one JSON line. Systems whose table is missing
are listed as missing (with the pipeline command), never guessed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SYSTEMS = {
    "pool6": "Learngene pool (tiny6 + base6, transposed-mean init)",
    "pool6_lsinit": "Learngene instances + least-squares init (ablation)",
    "snnet_r20_r56": "SN-Net (ResNet-20 + ResNet-56 anchors, least-squares init)",
}


def load(models: Path) -> dict:
    out = {}
    for key in SYSTEMS:
        p = models / f"{key}.descendants.json"
        if p.exists():
            out[key] = json.loads(p.read_text())
    scratch = []
    for p in sorted(
        models.parent.parent.glob("runs/learngene_scratch_*/*/system.descendants.json")
    ):
        t = json.loads(p.read_text())
        scratch += t["descendants"]
    out["scratch"] = scratch
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| id | descendant | blocks | params | MFLOPs | cpu1_b1 ms | val % | test % |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["flops"]):
        lat = r.get("latency_ms")
        lines.append(
            f"| {r['id']} | {r['label']} | {r.get('depth_blocks', '')} | {r['params']:,} | "
            f"{r['flops'] / 1e6:.1f} | {'' if lat is None else f'{lat:.3f}'} | "
            f"{r.get('val_acc', '')} | {r.get('test_acc', '')} |"
        )
    return "\n".join(lines)


def claims(t: dict) -> dict:
    c: dict = {}
    pool, sn, ls = t.get("pool6"), t.get("snnet_r20_r56"), t.get("pool6_lsinit")
    if pool and sn:
        c["storage_params"] = {
            "pool": pool["stored_params"]["total"],
            "snnet": sn["stored_params"]["total"],
            "ratio_snnet_over_pool": round(
                sn["stored_params"]["total"] / pool["stored_params"]["total"], 2
            ),
        }
        smallest = min(sn["descendants"], key=lambda r: r["flops"])
        below = [r for r in pool["descendants"] if r["flops"] < smallest["flops"]]
        c["smaller_than_smallest_anchor"] = {
            "snnet_smallest": {k: smallest.get(k) for k in ("label", "flops", "test_acc")},
            "pool_descendants_below": len(below),
            "of": len(pool["descendants"]),
            "their_test_acc_range": [
                min(r["test_acc"] for r in below),
                max(r["test_acc"] for r in below),
            ]
            if below
            else None,
        }
    if pool and (ls or pool.get("val_acc_at_init_lsinit")):
        init = {}
        if pool.get("val_acc_at_init") and pool.get("val_acc_at_init_lsinit"):
            stitched = [r["id"] for r in pool["descendants"] if r.get("back") is not None]
            a = [pool["val_acc_at_init"][str(i)] for i in stitched]
            b = [pool["val_acc_at_init_lsinit"][str(i)] for i in stitched]
            init["before_finetune_val_mean"] = {
                "ours": round(sum(a) / len(a), 2),
                "lsinit": round(sum(b) / len(b), 2),
            }
        if ls:
            pr = {r["id"]: r for r in pool["descendants"] if r.get("back") is not None}
            lr = {r["id"]: r for r in ls["descendants"] if r.get("back") is not None}
            ids = sorted(set(pr) & set(lr))
            init["after_finetune_test_mean"] = {
                "ours": round(sum(pr[i]["test_acc"] for i in ids) / len(ids), 2),
                "lsinit": round(sum(lr[i]["test_acc"] for i in ids) / len(ids), 2),
                "ours_better_on": sum(pr[i]["test_acc"] > lr[i]["test_acc"] for i in ids),
                "of": len(ids),
            }
        c["learned_init_vs_least_squares"] = init
    return c


def plot(t: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, marker in (
        ("pool6", "o"),
        ("pool6_lsinit", "s"),
        ("snnet_r20_r56", "^"),
    ):
        if key in t:
            rows = sorted(t[key]["descendants"], key=lambda r: r["flops"])
            ax.plot(
                [r["flops"] / 1e6 for r in rows],
                [r["test_acc"] for r in rows],
                marker=marker,
                linestyle="",
                label=SYSTEMS[key],
            )
    if t.get("scratch"):
        ax.plot(
            [r["flops"] / 1e6 for r in t["scratch"]],
            [r["test_acc"] for r in t["scratch"]],
            marker="x",
            linestyle="",
            color="k",
            label="scratch (same step budget)",
        )
    ax.set_xlabel("MFLOPs per image (32x32)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="outputs/models/learngene")
    ap.add_argument("--plot", default="docs/results/learngene_acc_flops.png")
    a = ap.parse_args()
    t = load(Path(a.models))
    for key, title in SYSTEMS.items():
        if key not in t:
            print(f"\n### {title}\n\nmissing: run `bash scripts/learngene_cpu.sh`\n")
            continue
        s = t[key]
        print(f"\n### {title}\n\nstored parameters: {s['stored_params']}\n")
        print(table(s["descendants"]))
    if t.get("scratch"):
        print("\n### Scratch-trained descendant shapes\n")
        print(table(t["scratch"]))
    c = claims(t)
    print("\n### Claims\n")
    print(json.dumps(c, indent=1))
    if any(k in t for k in SYSTEMS):
        plot(t, Path(a.plot))
        print(f"\nplot: {a.plot}")
    print(json.dumps({"learngene_report": c}))


if __name__ == "__main__":
    main()
