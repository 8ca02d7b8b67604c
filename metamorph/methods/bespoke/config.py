"""Typed schemas of Bespoke's config groups: ``task=bespoke_preprocess`` (the model house),
``task=bespoke_retrain`` (the student's distillation) and ``metamorph-customize method=bespoke``
(the search)."""

from __future__ import annotations

from dataclasses import dataclass, field

from metamorph.config.schema import OptimConfig, SchedulerConfig

ALTERNATIVE_KINDS = ("teacher_run", "public_run", "pruned", "lowrank")  # Bespoke's house
LANA_KINDS = ("identity", "dwsep")  # the LANA baseline's hand-designed ones (plus pruned)
ALL_KINDS = ALTERNATIVE_KINDS + LANA_KINDS
SEARCHES = ("anneal", "lana")


@dataclass
class HouseConfig:
    """What goes into the model house (segments and their sampled alternatives)."""

    min_len: int = 2  # shortest teacher segment (blocks) that gets alternatives
    max_len: int = 4  # longest
    max_segments: int = 0  # segments sampled (seeded) from the enumerated ones; 0: all
    per_segment: int = 2  # K alternatives sampled per segment
    sample: bool = True  # false: every candidate of every segment (the LANA house), no sampling
    kinds: list[str] = field(default_factory=lambda: list(ALTERNATIVE_KINDS))
    public: list[str] = field(default_factory=lambda: ["resnet20", "resnet32", "resnet44"])
    public_dir: str | None = None  # folder of the akamaster .th files (resnet20-*.th, ...)
    keep_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5])  # pruned hidden widths
    rank_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5])  # Tucker-2 ranks
    seed: int = 0


@dataclass
class MimicConfig:
    """How each alternative learns to mimic its teacher segment (feature MSE on cached features)."""

    images: int = 2000  # training images whose teacher features are cached
    proxy_images: int = 500  # held-out training images (the val carve-out) for the search
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3  # Adam
    n_jobs: int = 1  # alternatives trained in parallel (joblib), one thread each
    latency_min_run_time: float = 0.1  # seconds of timed calls per latency-table entry


@dataclass
class PreprocessConfig:
    """``task=bespoke_preprocess``: the teacher, the house, the mimic training, the device."""

    name: str = "bespoke_preprocess"
    teacher: str | None = None  # the teacher model file (.json) or akamaster .th
    device: str = "cpu1_b1"  # the profile every alternative is measured on
    out: str | None = None  # the house folder (null: the run folder); the same one resumes
    house: HouseConfig = field(default_factory=HouseConfig)
    mimic: MimicConfig = field(default_factory=MimicConfig)


@dataclass
class AnnealConfig:
    steps: int = 150
    t0: float = 1.0  # initial temperature (score points: accuracy in %)
    alpha: float = 0.97  # geometric cooling T <- alpha * T per step
    penalty: float = 2.0  # score = acc - penalty * 100 * max(0, latency / budget - 1)
    seed: int = 0


@dataclass
class BespokeCustomizeConfig:
    """``metamorph-customize method=bespoke``'s options (``bespoke.*``)."""

    house: str | None = None  # the run folder task=bespoke_preprocess wrote (house.json inside)
    search: str = "anneal"  # anneal (Bespoke) | lana (integer program over solo proxy scores)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    teacher_only: bool = False  # ablation: only alternatives built from the teacher's own blocks
    calibrate: bool = True  # scale declared sums by the teacher's end-to-end latency now / its sum
    latency_scale: float | None = None  # a given scale instead (e.g. from repeated runs); > 0
    proxy_images: int = 0  # proxy images scoring the search (the first n cached; 0: all)
    retries: int = 0  # searches again, aiming lower, when every ranked state measures over
    measure_repeats: int = 1  # end-to-end measurements per state; the fastest counts (load spikes)
    top_states: int = 5  # best feasible states measured end to end, in score order, if needed
    eval_test: bool = True  # report the chosen student's test accuracy before retraining
    onnx: bool = True  # also write <out>.onnx


@dataclass
class RetrainConfig:
    """``task=bespoke_retrain``: distillation of the chosen student from the teacher."""

    name: str = "bespoke_retrain"
    student: str | None = None  # the model file metamorph-customize method=bespoke wrote
    teacher: str | None = None  # the teacher model file (not needed with kd_weight 0)
    kd_weight: float = 0.9  # loss = kd_weight * T^2 KL + (1 - kd_weight) * CE
    kd_temperature: float = 4.0
    test_before: bool = True  # test accuracy of the student before retraining (same split)
    onnx: bool = True
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(name="sgd", lr=0.01, weight_decay=5e-4)
    )
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
