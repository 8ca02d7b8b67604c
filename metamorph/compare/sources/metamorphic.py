"""Points of a metamorphic checkpoint (NeuMeta's last block, the full-network recipes).

Each swept shape is materialized as the plain network ``metamorph-sample`` would ship (EMA INR,
K-sample averaged emission, kept BN folded with the shape's own statistics), timed from
checkpoint to network; seen means inside the trained widths and depths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from metamorph.compare.registry import Candidate, Found, register_point_source


@dataclass
class SweepOptions:
    ckpt: str = ""  # the task=metamorph checkpoint
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    depths: list[int] = field(default_factory=list)  # uniform depths at full width
    widths_above: list[float] = field(default_factory=list)  # width factors above 1
    k: int | None = None  # K-sample averaging (null: the checkpoint's eval_k)
    bn_images: int = 0  # kept BN: statistics on this many train images (0: the stored ones)
    bn_augment: bool = True  # kept BN: statistics' images crop+flip augmented as in training
    calibrate: int = 0  # folded networks: channel statistics calibrated on this many images
    remake: str = ""  # the command that makes the checkpoint (quoted when it is missing)


@register_point_source("metamorphic", options=SweepOptions)
def metamorphic_points(opts: SweepOptions, ctx) -> Found:
    from metamorph.export.sample import (
        calibration_images,
        materialize,
        reference_stats_for,
        use_bn_images,
    )
    from metamorph.hypernet.evaluate import sweep_points

    path, module = ctx.load_checkpoint(
        opts.ckpt, "metamorph", "metamorphic checkpoint", opts.remake
    )
    module.eval()
    net = module.net
    k = module.cfg.eval_k if opts.k is None else int(opts.k)
    if k < 1:
        raise ValueError(f"k={opts.k} must be at least 1")
    ctx.setup()
    ctx.dm.set_normalization(net.base_arch.mean, net.base_arch.std)
    calib = calibration_images(ctx.dm, int(opts.calibrate), ctx.seed)
    n_bn = use_bn_images(net, ctx.dm, int(opts.bn_images), ctx.seed)
    net.bn_augment = bool(opts.bn_augment)
    pts = sweep_points(
        net,
        [float(g) for g in opts.gammas],
        [int(d) for d in opts.depths],
        [float(f) for f in opts.widths_above],
    )
    if not pts:
        raise ValueError(f"{path}: the sweep is empty; give gammas and/or depths")
    for p in pts:
        net.check_shape(p.hidden)
    ref = None if calib is None else reference_stats_for(module, calib, k=k, seed=ctx.seed)
    series = {"g": "width", "d": "depth", "x": "wider"}  # label prefixes of sweep_points

    def candidates():
        for p in pts:
            t0 = time.perf_counter()
            model = materialize(module, p.hidden, k, ctx.seed, calib, ref)
            dt = time.perf_counter() - t0
            yield Candidate(
                series=series.get(p.label[0], "shape"),
                descriptor={"label": p.label, "gamma": round(p.gamma, 4), "hidden": p.hidden},
                model=model,
                seen=bool(p.seen),
                make_s=dt,
                artefact=str(path),
            )

    notes = [f"EMA INR, K={k}"]
    if net.base_arch.bn_blocks:
        aug = "crop+flip augmented" if opts.bn_augment else "not augmented"
        notes.append(f"kept-BN statistics of each shape on {n_bn} train images ({aug})")
    if calib is not None:
        notes.append(f"channel statistics calibrated on {len(calib)} train images")
    return Found(candidates(), make_what="emission + fold (metamorph-sample)", notes=notes)
