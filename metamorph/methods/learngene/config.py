"""Typed schemas of Learngene Pool's config groups (``task=learngene_aux``,
``task=learngene_stitch``) and of ``metamorph-customize method=learngene``."""

from __future__ import annotations

from dataclasses import dataclass, field

from metamorph.config.schema import OptimConfig, SchedulerConfig


def _adamw() -> OptimConfig:
    return OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05)


@dataclass
class AuxConfig:
    """Distil one auxiliary model (reduced width and depth) from the ancestry."""

    name: str = "learngene_aux"
    ancestry: str | None = None  # the ancestry network: a model file (.json) or akamaster .th
    width: float = 0.5  # stage widths = round(width * ancestry's)
    blocks: int = 6  # total blocks, spread evenly over the ancestry's stages
    positions: str = "front_end"  # supervised (student, teacher) block pairs: end | front_end
    ce_weight: float = 0.1  # alpha: L = a CE + (1 - a) (logit KD + block MSE [+ attention MSE])
    temperature: float = 1.0
    logit_reduction: str = "mean"  # mean: over batch x classes (official) | batchmean: per image
    rep_weight: float = 1.0  # weight of the block-output (and attention) MSE terms
    init: str = "random"  # random (the paper) | ancestry: evenly spaced ancestry blocks (width 1.0)
    optim: OptimConfig = field(default_factory=_adamw)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class StitchConfig:
    """Build a stitched system (Learngene pool or SN-Net) and fine-tune it once."""

    name: str = "learngene_stitch"
    system: str = "pool"  # pool (auxiliary models) | snnet (pretrained anchors); a label
    members: list[str] = field(default_factory=list)  # model files, smallest first
    init: str = "ours"  # ours (transposed mean learned map) | snnet (least squares) | random
    init_images: int = 100  # training images of the least-squares init
    random_members: bool = False  # true: members re-initialised (scratch training)
    ancestry: str | None = None  # the KD teacher (null: no distillation)
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    temperature: float = 1.0
    # train: BN running statistics updated by every sampled descendant (shared by all of them);
    # frozen: the members' own statistics kept (BN layers in eval mode, affine still trained)
    bn_stats: str = "train"
    # > 0: after the fine-tune, each evaluated descendant's BN statistics re-estimated on this
    # many training images and stored for it in the system file (exports carry them)
    bn_images: int = 0
    paths: list[int] | None = None  # descendants sampled in training (null: all, uniformly)
    probes: list[int] | None = None  # descendants validated each epoch (null: every member)
    evaluate: bool = True  # evaluate every descendant on val + test at the end
    evaluate_ids: list[int] | None = None  # only these descendants (null: every one)
    latency: bool = True  # and measure each one on `latency_device`
    latency_device: str = "cpu1_b1"
    optim: OptimConfig = field(default_factory=_adamw)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class LearngeneCustomizeConfig:
    """``metamorph-customize method=learngene``'s options (``learngene.*``)."""

    pool: str | None = None  # the stitched system file task=learngene_stitch wrote (.json)
    table: str | None = None  # its evaluated descendants (null: <pool>.descendants.json)
    descendant: int | None = None  # export this descendant id instead of choosing one
    onnx: bool = True  # also write <out>.onnx
