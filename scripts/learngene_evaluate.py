"""Evaluate more descendants of a fine-tuned stitched system (Learngene pool or SN-Net) without
training again: each one's BN statistics re-estimated (as ``task.bn_images`` does), its val / test
accuracy, params, FLOPs and ``cpu1_b1`` latency, merged into the system's descendants table
(``<system>.descendants.json``) and the statistics saved in the system file. Rows already in the
table are kept unless ``--redo``.

    OMP_NUM_THREADS=1 python scripts/learngene_evaluate.py outputs/models/learngene/snnet_r20_r56.json

Data: ``../shared/data/cifar10-jpeg`` with the recipes' 1,000-image val carve-out and seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("system", help="the system file (.json) task=learngene_stitch exported")
    ap.add_argument("--ids", default="all", help="comma-separated descendant ids, or all")
    ap.add_argument("--bn-images", type=int, default=512)
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg"))
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu1_b1", help="latency profile ('' : no latency)")
    ap.add_argument("--redo", action="store_true", help="re-evaluate rows already in the table")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from metamorph.io.atomic import atomic_write_text
    from metamorph.methods.learngene.pool import load_system, save_system
    from metamorph.methods.learngene.task import (
        evaluate_descendants,
        recalibrate_descendants,
        table_path,
    )
    from metamorph.runtime.data import build_datamodule

    path = Path(args.system)
    system = load_system(path)
    tpath = table_path(path)
    if not tpath.is_file():
        raise SystemExit(f"{tpath} not found: evaluate the system with task=learngene_stitch first")
    table = json.loads(tpath.read_text())
    done = {r["id"] for r in table["descendants"]}
    ids = (
        [d.id for d in system.descendants]
        if args.ids == "all"
        else [int(i) for i in args.ids.split(",")]
    )
    for i in ids:
        system.descendant(i)  # a bad id fails here, naming the valid range
    todo = [i for i in ids if args.redo or i not in done]
    data = OmegaConf.create(
        {"name": "cifar10", "root": args.data_root, "download": False, "cache_dir": None,
         "val_size": args.val_size, "batch_size": 250, "num_workers": 0}
    )  # fmt: skip
    dm = build_datamodule(data, seed=args.seed)
    dm.setup("fit")
    arch0 = system.members[0].arch
    dm.set_normalization(arch0.mean, arch0.std)
    t0 = time.time()
    if args.bn_images > 0:
        recalibrate_descendants(system, dm, args.bn_images, todo, args.seed)
    rows = evaluate_descendants(system, dm, todo, args.device or None)
    keep = [r for r in table["descendants"] if r["id"] not in set(todo)]
    table["descendants"] = sorted(keep + rows, key=lambda r: r["id"])
    meta = getattr(system, "meta", {})
    save_system(system, path, meta=meta)
    atomic_write_text(tpath, json.dumps(table, indent=1))
    out = {"system": str(path), "evaluated": todo, "rows": len(table["descendants"]),
           "time_s": round(time.time() - t0, 1)}  # fmt: skip
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
