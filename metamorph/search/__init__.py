"""GeneCAI-style genetic search for per-layer compression (Javaheripi et al., GECCO 2020).

Genotype spaces (:mod:`~metamorph.search.spaces`) translate genotypes bijectively into
compressed networks without retraining: Tucker-2 rank bins per k x k conv
(:class:`DecompositionSpace`), per-block hidden-channel pruning rates (:class:`PruningSpace`),
or per-block widths (and stage depths) emitted by a metamorphic checkpoint's INR
(:class:`MetamorphSpace`). Fitness is search-set accuracy (training data) and analytic FLOPs
(:mod:`~metamorph.search.flops`); the search is pymoo NSGA-II or GeneCAI's scalar roulette GA
(:mod:`~metamorph.search.ga`), populations are evaluated in joblib workers
(:mod:`~metamorph.search.evaluate`), and :func:`run_pipeline` chains decomposition, fine-tuning,
pruning and fine-tuning as in the paper.

Importing this package registers the ``cifar_resnet_lowrank`` model family, so
``metamorph.load`` can read decomposed networks saved by :func:`save_compressed`.
"""

from metamorph.search.config import SearchConfig
from metamorph.search.evaluate import (
    DecompositionEvaluator,
    MetamorphEvaluator,
    PopulationEvaluator,
    PruningEvaluator,
)
from metamorph.search.finetune import FinetuneConfig, finetune
from metamorph.search.flops import model_flops, resnet_flops, resnet_layer_flops
from metamorph.search.ga import (
    EvalStore,
    GAConfig,
    extract_bounds,
    initial_population,
    non_dominated,
    run_nsga2,
    run_scalar,
    scalar_score,
)
from metamorph.search.lowrank import (
    LOWRANK_FAMILY,
    Tucker2Conv,
    TuckerCache,
    decompose_conv,
    load_compressed,
    rank_levels,
    save_compressed,
)
from metamorph.search.pipeline import run_pipeline, search_phase, uniform_l1_baseline
from metamorph.search.prune import (
    ChannelMasks,
    channel_order,
    channel_saliency,
    prunable_blocks,
    prune_physical,
)
from metamorph.search.spaces import DecompositionSpace, MetamorphSpace, PruningSpace, Space

__all__ = [
    "LOWRANK_FAMILY",
    "ChannelMasks",
    "DecompositionEvaluator",
    "DecompositionSpace",
    "EvalStore",
    "FinetuneConfig",
    "GAConfig",
    "MetamorphEvaluator",
    "MetamorphSpace",
    "PopulationEvaluator",
    "PruningEvaluator",
    "PruningSpace",
    "SearchConfig",
    "Space",
    "Tucker2Conv",
    "TuckerCache",
    "channel_order",
    "channel_saliency",
    "decompose_conv",
    "extract_bounds",
    "finetune",
    "initial_population",
    "load_compressed",
    "model_flops",
    "non_dominated",
    "prunable_blocks",
    "prune_physical",
    "rank_levels",
    "resnet_flops",
    "resnet_layer_flops",
    "run_nsga2",
    "run_pipeline",
    "run_scalar",
    "save_compressed",
    "scalar_score",
    "search_phase",
    "uniform_l1_baseline",
]
