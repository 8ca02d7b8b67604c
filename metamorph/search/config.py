"""Schema of the ``search`` config group (validated with :func:`metamorph.config.schema.typed`,
so a typo such as ``search.pop_sise=10`` fails with the list of valid keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from metamorph.search.finetune import FinetuneConfig

PHASES = ("decompose", "prune", "metamorph")


@dataclass
class OperatorConfig:
    p_cross: float = 0.2  # GeneCAI: probability a selected pair is crossed over
    p_swap: float = 0.2  # uniform crossover: per-gene swap probability
    p_mutate: float = 0.8  # probability a child is mutated
    p_tweak: float = 0.05  # per-gene mutation probability
    sigma: float = 0.2  # Gaussian step of rate genes
    coeff: float = 100.0  # scalar score exp(coeff * FLOPs saving)


@dataclass
class DecomposeConfig:
    bins: int = 8  # rank levels int(C * i / bins)
    exclude_stem: bool = True  # the 3-channel stem conv is not decomposed
    hooi_iters: int = 0  # HOOI refinement sweeps after the HOSVD (0 = plain HOSVD)
    acc_drop: float = 3.0  # constraint: acc >= base acc - acc_drop (percentage points)
    pick: str = "min_flops"  # point carried to the next phase: min_flops (GeneCAI) | max_acc


@dataclass
class PruneConfig:
    criterion: str = "taylor"  # channel saliency: taylor | grad (GeneCAI code) | l1
    acc_drop: float = 15.0  # before fine-tuning; GeneCAI's README used 60% absolute


@dataclass
class MetamorphSearchConfig:
    k: int = 1  # K-sample averaged emission during the search
    min_ratio: float | None = None  # width range (fraction of full); None = the trained range
    max_ratio: float | None = None
    depth: bool = True  # search per-stage depth when the checkpoint was trained over depths
    acc_drop: float = 5.0
    seed: int = 0  # emission noise seed (K > 1)


@dataclass
class FinalConfig:
    points: int = 3  # front points fine-tuned and saved (spread over FLOPs)
    flops_ratios: list[float] = field(default_factory=list)  # or: best point under each ratio
    finetune: bool = True
    report_test: bool = True  # test accuracy of the final models (reporting only)
    latency: bool = False  # latency of the final models on the device profile ``device``
    device: str = "cpu1_b1"  # a metamorph.devices profile (threads, batch, runtime, timing)


@dataclass
class BaselineConfig:
    enabled: bool = True  # a uniform baseline at matching FLOPs for each final front point
    # uniform_l1: uniform L1 pruning of the original (or emitted full-width) network;
    # uniform_gamma (method=metamorph only): the checkpoint's own uniform-ratio shape, emitted
    kind: str = "uniform_l1"
    criterion: str = "l1"


@dataclass
class SearchConfig:
    method: str = "genecai"
    phases: list[str] = field(default_factory=lambda: ["decompose", "prune"])
    algorithm: str = "nsga2"  # nsga2 | scalar
    pop_size: int = 50
    generations: int = 50
    search_images: int = 1000
    search_split: str = "val"  # val (carved from train) | train; never test
    eval_batch_size: int = 500
    n_jobs: int = 1
    threads_per_worker: int = 1
    bound_drop: float = 1.0  # per-layer bounds: keep acc >= base acc - bound_drop
    bound_step: float = 0.05  # rate sweep step of the bounds
    init_rejection: bool = True  # accept only initial samples meeting the threshold
    init_rounds: int = 4
    operators: OperatorConfig = field(default_factory=OperatorConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    metamorph: MetamorphSearchConfig = field(default_factory=MetamorphSearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    final: FinalConfig = field(default_factory=FinalConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)

    def __post_init__(self) -> None:
        from metamorph.runtime.search_methods import SEARCH_METHODS

        if self.method not in SEARCH_METHODS:
            raise ValueError(
                f"unknown search.method={self.method!r}; choose one of {SEARCH_METHODS.names()}"
            )
        bad = [p for p in self.phases if p not in PHASES]
        if bad or not self.phases:
            raise ValueError(f"search.phases={self.phases} must be a list from {PHASES}")
        SEARCH_METHODS.get(self.method).validate(self)
        if self.search_split not in ("val", "train"):
            raise ValueError(
                f"search.search_split={self.search_split!r}: the fitness uses training data only "
                "(val is carved from train); the test set is never searched on"
            )
        if self.algorithm not in ("nsga2", "scalar"):
            raise ValueError(f"unknown search.algorithm={self.algorithm!r}; choose nsga2 or scalar")
        if self.baseline.kind not in ("uniform_l1", "uniform_gamma"):
            raise ValueError(
                f"unknown search.baseline.kind={self.baseline.kind!r}; "
                "choose uniform_l1 or uniform_gamma"
            )
        if self.decompose.pick not in ("min_flops", "max_acc"):
            raise ValueError("search.decompose.pick must be min_flops or max_acc")
