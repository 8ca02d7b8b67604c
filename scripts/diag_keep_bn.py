#!/usr/bin/env python
"""Diagnostics of a kept-BatchNorm metamorphic checkpoint (issue 4), test split, EMA, K = 1.

``--bn-images N [N ...]``: test accuracy at gamma 0 / 0.25 / 0.5 with each shape's BN statistics
from the images stored in the checkpoint vs from N seeded training images (``--seeds``): how
much of a gap is the statistics' sample.

``--slice``: at the unseen narrow widths (gamma 0.625 / 0.75), the INR queried at that width vs
the shape emitted at the trained minimum width of every block and cut to the first d channels
(the slimmable network's way to go narrower): does the INR's extrapolation cost anything?

Example::

    OMP_NUM_THREADS=1 python scripts/diag_keep_bn.py outputs/models/full_resnet20_keepbn_sandwich_lr1_cpu.ckpt \\
        --data-root ../shared/data/cifar10-jpeg --bn-images 1024 8192 --slice
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from metamorph.baselines.pruning import load_eval_data  # noqa: E402
from metamorph.export.sample import calibration_images  # noqa: E402
from metamorph.hypernet.evaluate import batch_accuracy  # noqa: E402
from metamorph.hypernet.sampling import width_range  # noqa: E402
from metamorph.tasks.metamorph_train import load_metamorph_checkpoint  # noqa: E402


def cut_to(net, emitted: dict[str, torch.Tensor], hidden) -> dict[str, torch.Tensor]:
    """Block tensors emitted at a wider shape, cut to their shapes at ``hidden`` (the first d
    hidden channels)."""
    out = {}
    for name, t in emitted.items():
        shape = net.tensor_shape(name, hidden)
        out[name] = t[tuple(slice(0, n) for n in shape)]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--data-root", required=True)
    p.add_argument("--bn-images", type=int, nargs="*", default=[])
    p.add_argument("--seeds", type=int, nargs="*", default=[1])
    p.add_argument("--slice", action="store_true")
    a = p.parse_args(argv)
    module = load_metamorph_checkpoint(a.ckpt)
    net = module.net.eval()
    if not net.base_arch.bn_blocks:
        raise SystemExit(f"{a.ckpt}: no kept BatchNorm (trained with prepare.bn_strategy=fold)")
    dm = load_eval_data(a.data_root)
    dm.set_normalization(net.base_arch.mean, net.base_arch.std)
    batches = list(dm.normalized_batches("test", batch_size=1000))

    def acc(hidden, emitted) -> float:
        return batch_accuracy(lambda x: net(x, hidden, emitted), batches)

    for gamma in (0.0, 0.25, 0.5) if a.bn_images else ():
        h = net.shape_for_gamma(gamma)
        with module.eval_weights():
            raw = net.emit(h)
        cells = [f"stored {len(net.bn_calib)}: {acc(h, {**raw, **net.bn_statistics(h, raw)}):.2f}"]
        for n in a.bn_images:
            for seed in a.seeds:
                imgs = calibration_images(dm, n, seed=seed)
                stats = net.bn_statistics(h, raw, images=imgs)
                cells.append(f"{n} (seed {seed}): {acc(h, {**raw, **stats}):.2f}")
        print(f"gamma {gamma}: " + "  ".join(cells), flush=True)
    for gamma in (0.625, 0.75) if a.slice else ():
        h = net.shape_for_gamma(gamma)
        at_width = acc(h, module.emit_eval(h, k=1))
        lo = [
            [max(w, width_range(net, f"layer{s + 1}.{b}")[0]) for b, w in enumerate(row)]
            for s, row in enumerate(h)
        ]
        with module.eval_weights():
            cut = cut_to(net, net.emit(lo), h)
        cut.update(net.bn_statistics(h, cut))
        print(
            f"gamma {gamma}: INR at the width {at_width:.2f}  "
            f"emitted at the trained minimum and cut {acc(h, cut):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
