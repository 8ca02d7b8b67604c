#!/usr/bin/env python
"""Test accuracy of a slimmable checkpoint at each width, BN recalibrated on training images
crop+flip augmented as in training (the default) and, with ``--compare``, non-augmented too.

Checkpoints written before 2026-11-27 store statistics recalibrated on non-augmented images;
this script recomputes them for every width, so such checkpoints can be compared with kept-BN
metamorphic checkpoints evaluated by ``metamorph-eval`` (augmented by default).

Example::

    OMP_NUM_THREADS=2 python scripts/eval_slimmable.py outputs/models/slimmable_resnet20_all_cpu.ckpt \\
        --data-root ../shared/data/cifar10-jpeg --gammas 0 0.25 0.5 0.625 0.75 --compare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from metamorph.baselines.pruning import load_eval_data  # noqa: E402
from metamorph.hypernet.evaluate import batch_accuracy  # noqa: E402
from metamorph.tasks.slimmable import load_slimmable_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--data-root", required=True)
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.625, 0.75])
    p.add_argument("--calib-batches", type=int, default=20)
    p.add_argument("--compare", action="store_true", help="also non-augmented statistics")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    module = load_slimmable_checkpoint(a.ckpt).eval()
    slim = module.net
    dm = load_eval_data(a.data_root)
    dm.set_normalization(slim.net.arch.mean, slim.net.arch.std)
    test = list(dm.normalized_batches("test", batch_size=1000))
    modes = [True, False] if a.compare else [True]
    rows = []
    for augment in modes:
        module.cfg.calib_augment = augment
        batches = module.calibration_batches(a.calib_batches, dm=dm, seed=a.seed)
        for g in a.gammas:
            hidden = slim.shape_for_gamma(g)
            slim.calibrate(hidden, batches)
            with torch.no_grad():
                acc = batch_accuracy(slim.materialize(hidden).eval(), test)
            rows.append({"gamma": g, "augmented": augment, "acc": round(acc, 2)})
            print(
                f"gamma {g:g}  statistics {'augmented' if augment else 'not augmented'}: {acc:.2f}%",
                flush=True,
            )
    print(json.dumps({"ckpt": a.ckpt, "calib_batches": a.calib_batches, "rows": rows}))


if __name__ == "__main__":
    main()
