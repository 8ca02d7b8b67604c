"""Sampling standalone networks from a metamorphic checkpoint.

A target is a uniform compression ratio ``gamma``, an explicit ``hidden`` shape, or a
:class:`~metamorph.devices.Budget` (parameters, FLOPs, latency and memory on a device profile).
For a budget, :func:`select_for_budget` scores a fixed, seeded set of candidate shapes: cheap
analytic costs first, predicted latency only for shapes that pass them, then accuracy on a
held-out subset for the shapes within budget; the most accurate is measured end to end on the
device and returned only if it measures within budget (else the next one).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from metamorph.devices.budget import Budget, Option
from metamorph.devices.measure import Measurement
from metamorph.export.plots import gamma_label
from metamorph.hypernet.evaluate import (
    is_seen,
    random_shapes,
)
from metamorph.hypernet.metanet import MetaResNet, Shape
from metamorph.models.folding import fold_batchnorm
from metamorph.models.metrics import top1
from metamorph.models.resnet_cifar import CifarResNet
from metamorph.models.subnet import as_family, as_hidden, as_lists
from metamorph.runtime.checkpoints import checkpoint_kind, load_checkpoint
from metamorph.utils.profile import count_flops

# ----------------------------------------------------------------------------------------------
# Loading a metamorphic checkpoint (with kind checks)
# ----------------------------------------------------------------------------------------------


def load_metamorphic(path: str | os.PathLike):
    """The :class:`~metamorph.tasks.metamorph.MetamorphModule` of a ``task=metamorph``
    checkpoint (loaded with ``weights_only=True``), in eval mode.

    Raises ``ValueError`` naming the problem for checkpoints of other kinds (plain pretrain
    checkpoints, model files, ...) and truncated or corrupt files, ``FileNotFoundError`` for a
    missing path.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"metamorphic checkpoint {p} not found")
    if p.is_dir():
        raise ValueError(f"{p} is a directory; ckpt= needs a metamorphic checkpoint file (.ckpt)")
    kind = checkpoint_kind(p)
    if kind != "metamorph":
        what = {
            "model_file": "a plain model file (safetensors + JSON)",
            "akamaster": "a plain akamaster (foreign) checkpoint",
        }.get(
            kind,
            f"a plain task={kind} checkpoint" if kind == "pretrain" else f"a {kind} checkpoint",
        )
        raise ValueError(
            f"{p} is {what}, not a metamorphic checkpoint; sample from the "
            "metamorph.ckpt written by `metamorph-train task=metamorph`"
        )
    return load_checkpoint(p)


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------


def parse_hidden(value) -> Shape:
    """A shape from a list of lists, a JSON/YAML string, or a path to a JSON/YAML file."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (ListConfig, DictConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, str):
        text = value
        if len(value) < 4096 and Path(value).is_file():
            text = Path(value).read_text()
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"hidden={text!r} is not a JSON/YAML list of lists ({e})") from e
    return as_lists(as_hidden(value, prefix="hidden="))


def parse_gamma(value) -> float:
    try:
        g = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"gamma={value!r} is not a number; give a ratio in [0, 1)") from e
    if not math.isfinite(g) or not 0.0 <= g < 1.0:
        raise ValueError(
            f"compression ratio gamma={value} is outside [0, 1): gamma = 1 - width/full width, "
            "so 0 keeps the full width and values near 1 shrink every metamorphic block"
        )
    return g


def shape_for_target(
    net: MetaResNet, gamma=None, hidden=None, depth: int | Sequence[int] | None = None
) -> Shape:
    """The shape of a ``gamma`` (optionally at ``depth`` blocks per stage) or ``hidden`` target,
    checked against the network (widths 1..max, non-metamorphic blocks unchanged)."""
    if (gamma is None) == (hidden is None):
        raise ValueError("give exactly one of gamma= and hidden=")
    if hidden is not None:
        shape = parse_hidden(hidden)
    else:
        g = parse_gamma(gamma)
        full = [len(st) for st in net.base_arch.hidden]
        if depth is not None and not isinstance(depth, int):
            depth = [int(d) for d in depth]
            if len(depth) != len(full):
                raise ValueError(
                    f"depth={depth} gives {len(depth)} stages; the network has {len(full)} "
                    f"(give one int, or one per stage, e.g. {full})"
                )
        if depth is not None:  # the shape asked for, never silently cut
            for s, d in enumerate([depth] * len(full) if isinstance(depth, int) else depth):
                if not 1 <= int(d) <= full[s]:
                    raise ValueError(
                        f"depth {d} of stage {s + 1} is outside 1..{full[s]} (the stage's blocks "
                        "in the pretrained network)"
                    )
        shape = net.shape_for_gamma(g, depth=depth)
    check_trained_depth(net, shape)
    net.check_shape(shape)
    return shape


def check_trained_depth(net: MetaResNet, shape: Shape) -> None:
    """A shape with fewer blocks than the network needs a checkpoint trained to drop blocks
    (``task.scope.depth_choices``): its INR never learnt to serve shallower networks otherwise
    (the network itself can run them; a user target must not get one silently)."""
    full = [len(st) for st in net.base_arch.hidden]
    depths = [len(st) for st in shape] if isinstance(shape, (list, tuple)) else None
    if depths is None or len(depths) != len(full) or depths == full:
        return
    for s, (keep, n) in enumerate(zip(depths, full)):  # a dropped block must be metamorphic
        fixed = [
            f"layer{s + 1}.{b}" for b in range(n) if f"layer{s + 1}.{b}" not in net.meta_blocks
        ]
        dropped = [name for name in fixed if int(name.rsplit(".", 1)[1]) >= keep]
        if dropped:
            least = max(int(name.rsplit(".", 1)[1]) for name in fixed) + 1
            raise ValueError(
                f"stage {s + 1} keeps {keep} blocks, which drops {', '.join(dropped)}: not "
                f"metamorphic, so it must stay (metamorphic blocks: {', '.join(net.meta_blocks)}); "
                f"stage {s + 1} can keep {least}..{n} blocks"
            )
    if net.spec.depth_choices:
        return
    raise ValueError(
        f"shape {[list(st) for st in shape]} keeps {depths} blocks per stage, but this "
        "checkpoint was trained at fixed depth (task.scope.depth_choices is empty; metamorphic "
        f"blocks: {', '.join(net.meta_blocks)}), so it cannot drop blocks; valid depths: {full} "
        "only (leave depth= unset), or sample from a checkpoint trained with "
        "task.scope.depth_choices"
    )


# ----------------------------------------------------------------------------------------------
# Materialising
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def materialize(
    module,
    hidden: Shape,
    k: int | None = None,
    seed: int = 0,
    calibrate_images: torch.Tensor | None = None,
    reference_stats: dict | None = None,
) -> CifarResNet:
    """A standalone plain network at ``hidden`` from the evaluation emission of ``module``
    (EMA weights, K-sample averaged: :meth:`MetamorphModule.emit_eval`).

    With ``calibrate_images`` (normalized training images), each conv output channel is
    calibrated to the reference statistics of :func:`reference_stats_for` (the prepared
    network's, or the checkpoint's own full width with a trainable anchor)."""
    net: MetaResNet = module.net
    model = net.materialize(hidden, emitted=module.emit_eval(hidden, k=k, seed=seed))
    if model.arch.bn_blocks:  # kept BatchNorm, with this shape's statistics: fold it to deploy
        fold_batchnorm(model)
    if calibrate_images is not None:
        if reference_stats is None:
            reference_stats = reference_stats_for(module, calibrate_images, k=k, seed=seed)
        calibrate_emitted(model, net, calibrate_images, reference_stats)
    return model


def prepared_stats(net: MetaResNet, images: torch.Tensor) -> dict:
    """Per-channel conv statistics of ``net``'s prepared full network on ``images`` (CPU)."""
    from metamorph.models.calibrate import channel_stats

    return channel_stats(net.prepared_network(), images.cpu())


def reference_stats_for(module, images: torch.Tensor, k: int | None = None, seed: int = 0) -> dict:
    """The statistics a checkpoint's narrower shapes are calibrated to: the prepared network's,
    or, with a trainable anchor (the full-width weights were trained too), those of the
    checkpoint's own full-width network (uncalibrated evaluation emission)."""
    from metamorph.models.calibrate import channel_stats

    net: MetaResNet = module.net
    if not net.spec.anchor_trainable:
        return prepared_stats(net, images)
    full = materialize(module, net.full_shape, k=k, seed=seed)
    return channel_stats(full, images.cpu())


def calibrate_emitted(
    model: CifarResNet, net: MetaResNet, images: torch.Tensor, reference_stats: dict
) -> dict:
    """Calibrate a materialized network in place to ``reference_stats``
    (:func:`reference_stats_for`, computed once per checkpoint) with
    :func:`metamorph.models.calibrate.match_channel_stats`."""
    from metamorph.models.calibrate import match_channel_stats, relative_index_map

    maps = {}
    if net.inr.cfg.coords == "relative" and not net.spec.anchor:
        # a hidden channel j of width d sits at the coordinate of pretrained channel j * D / d
        modules = dict(model.named_modules())
        for blk in net.meta_blocks:
            conv = modules.get(f"{blk}.conv1")  # absent when the shape drops the block
            if conv is not None:
                maps[f"{blk}.conv1"] = relative_index_map(conv.out_channels, net.full_width(blk))
    return match_channel_stats(
        model, reference_stats, images.to(next(model.parameters()).device), index_maps=maps
    )


def shape_flops(net: MetaResNet, hidden: Shape) -> int:
    """Forward FLOPs of one 32x32 image, counted on the parameter-less template."""
    return count_flops(net.template(hidden))


def deployed_arch(net: MetaResNet, hidden: Shape):
    """The architecture :func:`materialize` writes for ``hidden`` (kept BatchNorm folded)."""
    arch = net.arch_for(hidden)
    if arch.bn_blocks:
        arch.bn_blocks = []
        arch.bn = False
    return arch


def shape_timing(
    net: MetaResNet,
    hidden: Shape,
    batch_size: int = 1,
    threads: int | None = None,
    min_run_time: float = 0.2,
):
    """Eager-PyTorch CPU timing (median, quartiles) of the plain network at ``hidden`` (weights do not change the
    time), measured by :func:`metamorph.devices.time_module` on an ad-hoc ``torch_cpu`` profile."""
    from metamorph.devices import DeviceProfile, time_module

    threads = int(threads or torch.get_num_threads())
    p = DeviceProfile(
        name=f"torch_cpu{threads}_b{batch_size}",
        threads=threads,
        batch_size=int(batch_size),
        warmup=1,
        min_run_time=float(min_run_time),
    )
    model = CifarResNet(deployed_arch(net, hidden))
    x = torch.randn(p.batch_size, model.arch.in_channels, p.resolution, p.resolution)
    return time_module(model, x, p)


def shape_latency_ms(
    net: MetaResNet,
    hidden: Shape,
    batch_size: int = 1,
    threads: int | None = None,
    min_run_time: float = 0.2,
) -> float:
    """The median of :func:`shape_timing`, in milliseconds."""
    return shape_timing(net, hidden, batch_size, threads, min_run_time).median_ms


# ----------------------------------------------------------------------------------------------
# Budgets (the one Budget type of metamorph.devices)
# ----------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One shape considered for a budget."""

    label: str
    hidden: Shape
    gamma: float
    seen: bool
    params: int = 0
    flops: int = 0
    memory_mb: float | None = None  # analytic, at the device profile's batch size
    predicted_latency_ms: float | None = None  # the profile's latency predictor
    measured: Measurement | None = None  # end to end on the profile (the chosen, and any tried)
    acc: float | None = None
    fails: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return 2 + 2 * sum(len(s) for s in self.hidden)

    @property
    def within_budget(self) -> bool:
        return not self.fails

    @property
    def measured_latency_ms(self) -> float | None:
        return None if self.measured is None else self.measured.latency_ms

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "hidden": self.hidden,
            "gamma": round(self.gamma, 4),
            "seen": self.seen,
            "depth": self.depth,
            "params": self.params,
            "flops": self.flops,
            "memory_mb": None if self.memory_mb is None else round(self.memory_mb, 4),
            "predicted_latency_ms": None
            if self.predicted_latency_ms is None
            else round(self.predicted_latency_ms, 4),
            "measured_latency_ms": None
            if self.measured is None
            else round(self.measured.latency_ms, 4),
            "acc": self.acc,
            "within_budget": self.within_budget,
            "fails": list(self.fails),
        }


def smallest_shape(net: MetaResNet) -> Shape:
    """The cheapest shape the network can emit: every metamorphic block at width 1, each stage
    at its fewest trained blocks (``depth_choices``; full depth when depth is fixed)."""
    choices = net.spec.depth_choices
    shape = []
    for s, stage in enumerate(net.base_arch.hidden):
        keep = max(1, min(len(stage), min(choices))) if choices else len(stage)
        shape.append(
            [1 if f"layer{s + 1}.{b}" in net.meta_blocks else stage[b] for b in range(keep)]
        )
    return shape


def candidate_shapes(
    net: MetaResNet,
    gamma_step: float = 0.025,
    max_gamma: float = 0.95,
    n_random: int = 16,
    seed: int = 0,
) -> list[Candidate]:
    """Uniform ratios on a grid (at every trained depth when depth varies), seeded non-uniform
    shapes inside the trained range, and the smallest shape; duplicates removed."""
    if not 0 < gamma_step < 1:
        raise ValueError(f"search.gamma_step={gamma_step} must be in (0, 1)")
    if not 0 <= max_gamma < 1:
        raise ValueError(f"search.max_gamma={max_gamma} must be in [0, 1)")
    gammas = [
        round(i * gamma_step, 6) for i in range(int(math.floor(max_gamma / gamma_step + 1e-9)) + 1)
    ]
    depths: list[int | None] = [None]
    depths += sorted({int(d) for d in net.spec.depth_choices if 0 < int(d)})
    raw: list[tuple[str, Shape, float]] = []
    for d in depths:
        for g in gammas:
            shape = net.shape_for_gamma(g, depth=d)
            achieved = net.gamma_of(shape)  # widths round to whole channels
            label = gamma_label(achieved)  # so the label is the ratio as reported
            raw.append((label if d is None else f"{label}-d{d}", shape, achieved))
    if n_random > 0:
        depth_varies = bool(net.spec.depth_choices)
        for i, h in enumerate(random_shapes(net, int(n_random), seed=seed, depth=depth_varies)):
            raw.append((f"rand{i}", h, net.gamma_of(h)))
    small = smallest_shape(net)
    raw.append(("min", small, net.gamma_of(small)))
    seen_keys: set[str] = set()
    out = []
    for label, h, g in raw:
        key = json.dumps(h)
        if key in seen_keys:
            continue
        seen_keys.add(key)
        out.append(Candidate(label, h, float(g), is_seen(net, h)))
    return out


def select_for_budget(
    module,
    candidates: list[Candidate],
    budget: Budget,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    k: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    predictor=None,
    measure: Callable[[torch.nn.Module], Measurement] | None = None,
) -> tuple[Candidate, list[Candidate]]:
    """Score ``candidates`` against ``budget`` and return ``(best, candidates)`` with
    :func:`metamorph.devices.select_within_budget`.

    Every candidate gets its parameters and FLOPs; memory (analytic) and predicted latency (the
    profile's :class:`~metamorph.devices.LatencyPredictor`, or ``predictor``) only those within
    the parameter/FLOP limits; accuracy (on ``batches``, EMA + K-sample emission) those within all
    of them. The most accurate (ties: fewer FLOPs, then parameters) is materialized and measured
    end to end on the budget's device (``measure``, default
    :func:`metamorph.devices.fresh.measure_deployed`: the model file in a fresh process, the
    figure ``metamorph-profile`` gives the written model); if it measures over budget the next is
    tried, and if none fits :class:`~metamorph.devices.BudgetError` is raised.
    """
    from metamorph.devices import LatencyPredictor, estimate_memory
    from metamorph.devices import select_within_budget as select

    family = as_family(module, k=k, seed=seed)
    log = log or (lambda s: None)
    batches = list(batches)
    profile = budget.profile if budget.needs_device else None
    for c in candidates:
        cost = family.costs(c.hidden)
        c.params, c.flops = cost["params"], cost["flops"]
        c.memory_mb = c.predicted_latency_ms = c.measured = c.acc = None
    options = [Option(c.label, c, params=c.params, flops=c.flops) for c in candidates]
    if budget.max_latency_ms is not None:
        predictor = predictor or LatencyPredictor(profile, log=log)
        if hasattr(predictor, "ensure"):  # measure the table's missing entries in one go
            cheap = [
                deployed_arch(family, c.hidden)
                for c in candidates
                if (budget.max_params is None or c.params <= budget.max_params)
                and (budget.max_flops is None or c.flops <= budget.max_flops)
            ]
            predictor.ensure(cheap)

    def memory(o: Option) -> float:
        est = estimate_memory(
            CifarResNet(deployed_arch(family, o.item.hidden)), profile.input_shape
        )
        return est.peak_mb

    def predict(o: Option) -> float:
        return predictor.predict(deployed_arch(family, o.item.hidden))

    def score(within: list[Option]) -> None:
        log(
            f"  evaluating {len(within)} shapes within budget on "
            f"{sum(len(y) for _, y in batches)} images"
        )
        t0 = time.perf_counter()
        for i, o in enumerate(within, 1):
            o.score = o.item.acc = top1(family.forward_fn(o.item.hidden), batches)
            left = (time.perf_counter() - t0) / i * (len(within) - i)
            log(f"    [{i}/{len(within)}] {o.label:<10} {o.item.acc:6.2f}%  (~{left:.0f} s left)")

    def measure_option(o: Option) -> Measurement:
        if hasattr(module, "emit_eval"):  # kept BatchNorm folded for deployment
            model = materialize(module, o.item.hidden, k=k, seed=seed).cpu()
        else:
            model = family.materialize(o.item.hidden).cpu()
        log(f"  measuring {o.label} end to end on {profile.name}")
        return (measure or budget.measure)(model)

    try:
        best = select(
            options,
            budget,
            predict=predict,
            memory=memory,
            measure=measure_option,
            score=score,
            log=log,
            what="shape",
            describe=lambda o: f" {json.dumps(o.item.hidden)}",
        )
    finally:
        for o in options:
            c = o.item
            c.fails, c.memory_mb, c.predicted_latency_ms = (
                list(o.fails),
                o.memory_mb,
                o.predicted_ms,
            )
            c.measured = o.measured
    return best.item, candidates


def val_batches(dm, split: str, n: int, seed: int = 0, batch_size: int | None = None, device=None):
    """Normalised batches of a seeded ``n``-image subset of ``split`` (kept in memory)."""
    if n is not None and int(n) < 1:
        raise ValueError(f"val_subset={n} must be at least 1")
    x, y = dm.subset(split, int(n), seed=seed) if n is not None else dm.split_tensors(split)
    if len(y) == 0:
        raise ValueError(
            f"the {split} split is empty; choose another split or a larger data.val_size"
        )
    return list(dm.normalized_batches((x, y), batch_size=batch_size, device=device))


def use_bn_images(net, dm, n: int, seed: int = 0) -> int:
    """Compute each shape's kept-BatchNorm statistics on ``n`` seeded training images of ``dm``
    instead of the images stored in the checkpoint (0: keep those); returns how many are used.
    More images give steadier statistics (issue 4: about +0.3 points from 1,024 to 8,192)."""
    if n < 0:
        raise ValueError(
            f"bn_images={n} must be 0 (the stored images) or a number of training images"
        )
    if n == 0:
        return len(net.bn_calib)
    if not net.base_arch.bn_blocks:
        raise ValueError(
            f"bn_images={n}: this checkpoint keeps no BatchNorm (trained with "
            "task.prepare.bn_strategy=fold), so there are no per-shape BN statistics to compute; "
            "drop bn_images (calibrate=N recalibrates a folded network's channel statistics)"
        )
    images, _ = dm.subset("train", n, seed=seed)  # raw pixels: augmented like the stored ones
    if len(images) == 0:
        raise ValueError("bn_images needs training images, but the train split is empty")
    net.set_bn_calibration(images)
    return len(images)


def calibration_images(dm, n: int, seed: int = 0) -> torch.Tensor | None:
    """``n`` seeded, normalized images of the train split for statistics calibration (None: 0)."""
    if n < 0:
        raise ValueError(f"calibrate={n} must be 0 (off) or a number of training images")
    if n == 0:
        return None
    x, _ = dm.subset("train", n, seed=seed)
    if len(x) == 0:
        raise ValueError("calibration needs training images, but the train split is empty")
    return dm.transform_batch(x)
