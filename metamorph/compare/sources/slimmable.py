"""Points of a slimmable checkpoint: each width sliced from the shared weights, its BN
statistics recalibrated on augmented training batches (as ``task=slimmable`` evaluates), timed
from checkpoint to network; seen means inside the trained width ratios."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from metamorph.compare.registry import Candidate, Found, register_point_source


@dataclass
class SlimmableOptions:
    ckpt: str = ""
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    calib_batches: int = 20  # training batches per width for the BN recalibration
    remake: str = ""


@register_point_source("slimmable", options=SlimmableOptions)
def slimmable_points(opts: SlimmableOptions, ctx) -> Found:
    path, module = ctx.load_checkpoint(opts.ckpt, "slimmable", "slimmable checkpoint", opts.remake)
    module.eval()
    slim = module.net
    if opts.calib_batches < 1:
        raise ValueError(f"calib_batches={opts.calib_batches} must be at least 1")
    ctx.setup()
    ctx.dm.set_normalization(slim.net.arch.mean, slim.net.arch.std)
    batches = module.calibration_batches(int(opts.calib_batches), dm=ctx.dm, seed=ctx.seed)
    lo, hi = min(module.cfg.train_widths), max(module.cfg.train_widths)

    def candidates():
        for g in opts.gammas:
            hidden = slim.shape_for_gamma(float(g))
            t0 = time.perf_counter()
            slim.calibrate(hidden, batches)
            with torch.no_grad():
                model = slim.materialize(hidden).eval()
            dt = time.perf_counter() - t0
            ratio = 1.0 - float(g)
            yield Candidate(
                series="width",
                descriptor={"gamma": float(g), "hidden": hidden},
                model=model,
                seen=lo - 1e-9 <= ratio <= hi + 1e-9,
                make_s=dt,
                artefact=str(path),
            )

    aug = "augmented" if module.cfg.calib_augment else "not augmented"
    return Found(
        candidates(),
        make_what="slice + BN recalibration",
        notes=[f"BN recalibrated on {opts.calib_batches} training batches ({aug})"],
    )
