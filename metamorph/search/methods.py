"""The built-in search methods (registered in :mod:`metamorph.runtime.search_methods`).

``genecai``: decomposition search -> fine-tune -> pruning search on a pretrained network
(``base=``); ``metamorph``: one search over the per-block widths (and stage depths) of a
metamorphic checkpoint (``ckpt=``). Each loads its source and runs its phases; the pipeline
(:func:`metamorph.search.pipeline.run_pipeline`) does the shared rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from metamorph.models.resnet_cifar import ResNetArch
from metamorph.runtime.search_methods import register_search_method
from metamorph.search.config import SearchConfig
from metamorph.search.evaluate import DecompositionEvaluator, MetamorphEvaluator, PruningEvaluator
from metamorph.search.finetune import finetune
from metamorph.search.flops import model_flops
from metamorph.search.prune import channel_order, channel_saliency
from metamorph.search.spaces import DecompositionSpace, MetamorphSpace, PruningSpace


@dataclass
class SearchSource:
    """What a method searches over: the file it came from and its architecture, plus the
    loaded base network (``genecai``) or metamorphic module (``metamorph``)."""

    label: str
    arch: ResNetArch
    model: nn.Module | None = None
    module: Any = None


@dataclass
class SearchContext:
    """The search set and run settings every method's phases share."""

    dm: Any
    xs: Any
    ys: Any
    batch_size: int
    seed: int
    log: Callable[[str], None]
    device: Any


@dataclass
class PhasesOutcome:
    """The phases run, the builder of the last phase's networks, the reference network the
    front is compared with, and the points carried between phases."""

    phases: list
    builder: Callable[[np.ndarray], nn.Module]
    ref_model: nn.Module
    carried: list[dict] = field(default_factory=list)


@register_search_method("genecai")
class GeneCAI:
    def validate(self, cfg: SearchConfig) -> None:
        if "metamorph" in cfg.phases:
            raise ValueError("the metamorph phase needs search.method=metamorph")
        if list(cfg.phases) not in (["decompose"], ["prune"], ["decompose", "prune"]):
            raise ValueError("search.phases must be [decompose], [prune] or [decompose, prune]")
        if cfg.baseline.kind == "uniform_gamma":
            raise ValueError("search.baseline.kind=uniform_gamma needs search.method=metamorph")

    def load_source(self, cfg) -> SearchSource:
        from metamorph.runtime.networks import load_any_model

        if not cfg.get("base"):
            raise ValueError(
                "metamorph-search needs base=<pretrained model file (.json) or akamaster .th>"
            )
        if not Path(str(cfg.base)).exists() and not Path(str(cfg.base) + ".json").exists():
            raise FileNotFoundError(f"base={cfg.base} not found")
        model = load_any_model(cfg.base).eval()
        return SearchSource(str(cfg.base), model.arch, model=model)

    def run_phases(self, source: SearchSource, cfg: SearchConfig, ctx: SearchContext):
        from metamorph.search.pipeline import accuracy_on, pick_carry, search_phase

        xs, ys, bs, seed, log = ctx.xs, ctx.ys, ctx.batch_size, ctx.seed, ctx.log
        original = source.model.eval()
        current = original
        phases, carried, builder = [], [], None
        for i, phase in enumerate(cfg.phases):
            last = i == len(cfg.phases) - 1
            if phase == "decompose":
                d = cfg.decompose
                space = DecompositionSpace(current, d.bins, d.exclude_stem)
                ev = DecompositionEvaluator(current, space, xs, ys, bs, d.hooi_iters).to(ctx.device)
                pr = search_phase(space, ev, cfg, d.acc_drop, seed, log)
            else:
                p = cfg.prune
                order = channel_order(channel_saliency(current, xs, ys, p.criterion))
                space = PruningSpace(current, order)
                ev = PruningEvaluator(current, space, xs, ys, bs).to(ctx.device)
                pr = search_phase(space, ev, cfg, p.acc_drop, seed + i, log)
            phases.append(pr)
            log(
                f"  [{phase}] {pr.evaluations['total']} evaluated in {pr.seconds:.1f}s; "
                f"front of {len(pr.front)} feasible points"
            )
            if last:
                builder = ev.build
                break
            rec = pick_carry(pr, cfg.decompose.pick)
            net = ev.build(np.array(rec.genotype)).to(ctx.device)
            acc_before = rec.acc
            ft = finetune(net, ctx.dm, cfg.finetune, seed) if cfg.final.finetune else {"steps": 0}
            acc_after = accuracy_on(net, xs, ys, bs)
            net = net.cpu()
            carried.append(
                {
                    "phase": phase,
                    "id": rec.id,
                    "flops": model_flops(net),
                    "search_acc": acc_before,
                    "search_acc_ft": acc_after,
                    "finetune_steps": ft["steps"],
                    "decoded": space.describe(np.array(rec.genotype)),
                }
            )
            log(
                f"  [{phase}] carried point #{rec.id}: {rec.flops / 1e6:.2f} MFLOPs, "
                f"{acc_before:.2f}% -> {acc_after:.2f}% after {ft['steps']} fine-tuning steps"
            )
            current = net
        return PhasesOutcome(phases, builder, original, carried)


@register_search_method("metamorph")
class MetamorphWidths:
    def validate(self, cfg: SearchConfig) -> None:
        if list(cfg.phases) != ["metamorph"]:
            raise ValueError("search.method=metamorph runs the single phase [metamorph]")

    def load_source(self, cfg) -> SearchSource:
        from metamorph.export.sample import load_metamorphic

        if not cfg.get("ckpt"):
            raise ValueError(
                "search=metamorph needs ckpt=<metamorphic checkpoint (metamorph.ckpt)>"
            )
        module = load_metamorphic(cfg.ckpt)
        return SearchSource(str(cfg.ckpt), module.net.base_arch, module=module)

    def run_phases(self, source: SearchSource, cfg: SearchConfig, ctx: SearchContext):
        from metamorph.search.pipeline import search_phase

        module = source.module
        m = cfg.metamorph
        space = MetamorphSpace(module.net, m.min_ratio, m.max_ratio, m.depth)
        ev = MetamorphEvaluator(
            space,
            ctx.xs,
            ctx.ys,
            ctx.batch_size,
            ckpt=source.label,
            module=module,
            k=m.k,
            seed=m.seed,
        ).to(ctx.device)
        original = ev.build(space.identity())
        pr = search_phase(space, ev, cfg, m.acc_drop, ctx.seed, ctx.log)
        return PhasesOutcome([pr], ev.build, original)
