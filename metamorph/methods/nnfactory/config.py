"""Typed schemas of NN-Factory's config groups (``task=nnfactory_supernet``,
``task=nnfactory_assembler``) and of ``metamorph-customize method=nnfactory``."""

from __future__ import annotations

from dataclasses import dataclass, field

from metamorph.config.schema import OptimConfig, SchedulerConfig


@dataclass
class SplitConfig:
    unseen_fraction: float = 0.2  # share of the class subsets held out as unseen tasks
    seed: int = 0  # which subsets are held out
    min_classes: int = 2
    max_classes: int = 5


@dataclass
class SupernetConfig:
    name: str = "nnfactory_supernet"
    groups: int = 4  # channel groups per block (width modules)
    max_sparsity: float = 0.9  # random masks switch off round(s * M) modules, s ~ U[0, max]
    full_prob: float = 0.25  # share of steps on the full mask
    ce_weight: float = 1.0  # cross-entropy over the task's images, logits restricted to the task
    kd_weight: float = 1.0  # distillation from the full network, restricted to the task's classes
    kd_temperature: float = 2.0
    probes: int = 4  # fixed (seen task, mask) pairs validated each epoch
    split: SplitConfig = field(default_factory=SplitConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class AssemblerConfig:
    name: str = "nnfactory_assembler"
    supernet: str | None = None  # the supernet model file task=nnfactory_supernet wrote (.json)
    hidden: int = 128  # MLP width
    layers: int = 2  # hidden layers
    use_task: bool = True  # false: ablation "G without the task input"
    use_sparsity: bool = True  # false: ablation "G without the sparsity input"
    mask_mode: str = "topk"  # topk | gumbel (straight-through, exact count of modules on)
    tau: float = 1.0  # temperature of the straight-through sigmoid
    max_sparsity: float = 0.9  # sparsity s ~ U[0, max] per step
    freeze_supernet: bool = True  # false: joint fine-tuning (ablation)
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 2.0
    probes: int = 4
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(name="adamw", lr=1e-3, weight_decay=0.0)
    )
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class NNFactoryCustomizeConfig:
    """``metamorph-customize method=nnfactory``'s method options (``nnfactory.*``)."""

    factory: str | None = None  # the factory file task=nnfactory_assembler wrote (.json)
    sparsities: list[float] = field(
        default_factory=lambda: [round(0.05 * i, 2) for i in range(19)]
    )  # the sparsity grid searched (0 .. 0.9)
    candidates: int = 3  # masks per sparsity: G's own plus Gumbel-perturbed ones
    rank_top: int = 6  # feasible candidates ranked on the proxy set: the least sparse ones (0: all)
    proxy_images: int = 256  # task images that rank the feasible candidates
    proxy_split: str = "val"  # where the proxy images come from (never the test split's)
    bn_images: int = 0  # >0: BN statistics of every ranked assembly re-estimated on this many train images of the task (0: the supernet's shared ones)
    eval_test: bool = True  # also report the chosen model's test accuracy on the task (untimed)
