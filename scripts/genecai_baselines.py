#!/usr/bin/env python
"""Uniform-L1 baselines for searched GeneCAI models, made exactly as `metamorph-search` makes them
(same search set, same pruning rule, same fine-tuning and seeds), for a front whose search run
stopped before its baselines (or to add baselines to an older run).

For each front model file (``front_<j>.json``): uniform L1 pruning of the base network at the
largest FLOPs not above the front model's, search-set accuracy, fine-tuning with the search's
``search.finetune`` settings (seed ``seed + 200 + j``, as the pipeline), test accuracy; the front
model's own test accuracy is measured too. Hydra overrides of the search config follow ``--``.

Example (the ResNet-56 search of issue 7)::

    python scripts/genecai_baselines.py --front outputs/gpu/s4/a1/models/front_1.json \\
        outputs/gpu/s4/a1/models/front_2.json --index 1 2 --device cuda --out outputs/genecai_r56 \\
        -- search_experiment=genecai/paper/resnet56_cifar10 base=outputs/models/resnet56_ft.json \\
        data.root=../shared/data/cifar10-jpeg search.finetune.max_steps=null

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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--front", nargs="+", required=True, help="front model files (.json)")
    ap.add_argument("--index", nargs="*", type=int, default=None, help="j of each front file")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="outputs/genecai_baselines")
    ap.add_argument("overrides", nargs="*", help="search config overrides (after --)")
    args = ap.parse_args(argv)

    from hydra import compose, initialize_config_dir

    from metamorph.config.locations import CONF_DIR
    from metamorph.config.schema import typed
    from metamorph.runtime.data import build_datamodule
    from metamorph.runtime.device import resolve_device
    from metamorph.runtime.networks import load_any_model
    from metamorph.search import load_compressed
    from metamorph.search.config import SearchConfig
    from metamorph.search.flops import model_flops
    from metamorph.search.lowrank import save_compressed
    from metamorph.search.pipeline import (
        baseline_row,
        search_set,
        test_accuracy,
        uniform_l1_baseline,
    )

    torch.set_num_threads(args.threads)
    index = args.index or list(range(len(args.front)))
    if len(index) != len(args.front):
        raise SystemExit("--index needs one j per --front file")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("search", overrides=list(args.overrides))
    scfg = typed(SearchConfig, cfg.search, "search")
    if not cfg.get("base"):
        raise SystemExit("give base=<pretrained model file> among the overrides")
    seed = int(cfg.seed)
    device = resolve_device(args.device)
    base = load_any_model(cfg.base).eval()
    dm = build_datamodule(cfg.data, mean=base.arch.mean, std=base.arch.std, seed=seed)
    dm.setup("fit")
    xs, ys = search_set(dm, scfg.search_split, scfg.search_images, seed)
    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    base_flops = model_flops(base)
    rows = []
    for j, path in zip(index, args.front):
        t0 = time.time()
        front = load_compressed(path).eval().to(device)
        target = model_flops(front)
        front_test = test_accuracy(front, dm)
        net, rate, reached = uniform_l1_baseline(base, target, scfg.baseline.criterion, xs, ys)
        torch.manual_seed(seed + 200 + j)
        net, made = baseline_row(
            net,
            j,
            matches=Path(path).stem,
            kind="uniform_l1",
            rate=rate,
            reached=reached,
            search=(xs, ys, scfg.eval_batch_size),
            dm=dm,
            finetune_cfg=scfg.finetune,
            seed=seed,
            base_flops=base_flops,
            report_test=True,
            device=device,
        )
        row = {
            "name": made["name"],
            "matches": made["matches"],
            "front_flops": target,
            "front_test_acc": round(front_test, 4),
            **{k: v for k, v in made.items() if k not in ("name", "kind", "matches", "params")},
            "seconds": round(time.time() - t0, 1),
            "device": str(device),
        }
        save_compressed(
            net.cpu(), out / "models" / row["name"], meta={"source": "uniform-l1", **row}
        )
        rows.append(row)
        print(
            f"{row['name']} (matches {row['matches']}, {target / 1e6:.2f} MFLOPs, test "
            f"{front_test:.2f}%): uniform L1 rate {rate:.3f} -> {row['flops'] / 1e6:.2f} MFLOPs, "
            f"search {row['search_acc']:.2f}% -> {row['search_acc_ft']:.2f}% after "
            f"{row['finetune_steps']} steps, "
            f"test {row['test_acc']:.2f}% ({row['seconds']} s)",
            flush=True,
        )
    with open(out / "baseline.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = {"baselines": rows, "out": str(out)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
