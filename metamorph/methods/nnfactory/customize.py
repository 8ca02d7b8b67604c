"""Customization with NN-Factory: (task, device budget) -> a compact task model, no training.

For each sparsity of a grid, the assembler G proposes its mask for the task (plus a few
Gumbel-perturbed alternatives); every candidate's costs come from its architecture (parameters,
FLOPs, analytic memory) and the device profile's latency predictor; the feasible ones are ranked
by task accuracy of the masked supernet on a small proxy set (images of the task's classes from
the training carve-out, never the test split); the best is physically extracted (channels
removed, skipped blocks gone, classifier cut to the task's classes) and measured end to end on
the profile (:func:`metamorph.devices.select_within_budget`: a candidate measured over budget is
passed over, and if none fits, :class:`~metamorph.devices.BudgetError` says what the smallest
achievable figures were). Nothing is written unless a model fits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metamorph.config.schema import typed
from metamorph.devices import Budget, LatencyPredictor, Option, estimate_memory
from metamorph.devices import select_within_budget as select
from metamorph.export.outputs import output_format, write_customized
from metamorph.methods.nnfactory.assembler import modules_on
from metamorph.methods.nnfactory.class_tasks import (
    Task,
    filter_to_task,
    multi_hot,
    parse_task,
    task_accuracy,
    task_names,
)
from metamorph.methods.nnfactory.config import NNFactoryCustomizeConfig
from metamorph.methods.nnfactory.factory import Factory, load_factory
from metamorph.methods.nnfactory.supernet import arch_costs
from metamorph.models.calibrate import recalibrate_batchnorm
from metamorph.models.resnet_cifar import CifarResNet
from metamorph.runtime.customizers import register_customizer


@dataclass
class Candidate:
    sparsity: float
    mask: tuple[int, ...]
    source: str  # "G" or "G+noise<k>"
    proxy_acc: float | None = None

    @property
    def label(self) -> str:
        return f"s{self.sparsity:g}/{self.source}"


@dataclass
class Customized:
    model: CifarResNet
    task: Task
    chosen: Candidate
    option: Option
    options: list[Option] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def candidates_for(
    factory: Factory, task: Task, sparsities, per_sparsity: int, seed: int = 0
) -> list[Candidate]:
    """G's mask for ``task`` at every sparsity, plus ``per_sparsity - 1`` perturbed ones (Gumbel
    noise on G's scores, same count of modules on); duplicates dropped."""
    if per_sparsity < 1:
        raise ValueError(f"nnfactory.candidates={per_sparsity} must be at least 1")
    vec = multi_hot(task, factory.assembler.num_classes)
    seen: set = set()
    out = []
    with torch.no_grad():
        for s in sparsities:
            s = float(s)
            modules_on(factory.assembler.num_modules, s)  # range check, clear error
            for k in range(per_sparsity):
                gen = torch.Generator().manual_seed(seed * 7919 + k * 131 + int(round(s * 1000)))
                mode = "gumbel" if k > 0 else "topk"
                m = factory.assembler.mask(vec, s, mode, factory.tau, noise=k > 0, generator=gen)
                mask = tuple(int(v) for v in m.round().tolist())
                if mask in seen:
                    continue
                seen.add(mask)
                out.append(Candidate(s, mask, "G" if k == 0 else f"G+noise{k}"))
    return out


def customize(
    factory: Factory,
    task: Task,
    budget: Budget,
    proxy: tuple[torch.Tensor, torch.Tensor],
    sparsities,
    per_sparsity: int = 3,
    seed: int = 0,
    rank_top: int = 6,
    predictor=None,
    measure: Callable[[torch.nn.Module], object] | None = None,
    log: Callable[[str], None] | None = None,
    candidates: list[Candidate] | None = None,
    bn_images: torch.Tensor | None = None,
) -> Customized:
    """The most accurate (on ``proxy``) assembly within ``budget``, extracted and measured;
    ``rank_top``: how many of the least sparse feasible ones are ranked (0: all).

    ``candidates``: search these masks instead of G's (the baselines: random or task-agnostic
    masks through the same search). ``bn_images``: normalised images of the task whose batch
    statistics replace the BatchNorm running statistics of every assembly ranked and of the
    one returned (:func:`recalibrate`); ``None`` keeps the supernet's shared statistics."""
    log = log or (lambda s: None)
    t0 = time.perf_counter()
    sn = factory.supernet.eval()
    if candidates is None:
        candidates = candidates_for(factory, task, sparsities, per_sparsity, seed)
    cands = candidates
    t_gen = time.perf_counter()
    profile = budget.profile if budget.needs_device else None
    options = []
    for c in cands:
        arch = sn.arch_for(c.mask, task)
        costs = arch_costs(arch, profile.resolution if profile is not None else 32)
        options.append(Option(c.label, (c, arch), params=costs["params"], flops=costs["flops"]))
    if budget.max_latency_ms is not None and predictor is None:
        predictor = LatencyPredictor(profile, log=log)
    lut_measured = 0
    if budget.max_latency_ms is not None and hasattr(predictor, "ensure"):
        # missing look-up-table entries measured in one pass (once per machine: cached)
        lut_measured = predictor.ensure([o.item[1] for o in options])
    t_lut = time.perf_counter()

    def memory(o: Option) -> float:
        return estimate_memory(CifarResNet(o.item[1]), profile.input_shape).peak_mb

    def predict(o: Option) -> float:
        return predictor.predict(o.item[1])

    x, y = proxy

    def score(within: list[Option]) -> None:
        # the least sparse feasible assemblies (closest to the budget) are the ones worth
        # ranking; the rest rank after them, closest to the budget first (a negative score: if
        # every ranked one measures over budget, the next tried is the next largest, not the
        # smallest network)
        order = sorted(within, key=lambda o: -(o.predicted_ms or o.flops))
        picked = order[: rank_top or None]
        for i, o in enumerate(order[len(picked) :]):
            o.score = -1.0 - i
        log(
            f"  ranking {len(picked)} of {len(within)} feasible assemblies on {len(y)} proxy images"
        )
        local = tuple(range(len(task)))
        px, ly = filter_to_task(x, y, task)
        for o in picked:
            c = o.item[0]
            small = sn.extract(c.mask, task)  # the same outputs as the masked supernet, cheaper
            recalibrate(small, bn_images)
            c.proxy_acc = task_accuracy(small, [(px, ly)], local, restricted=True)
            o.score = c.proxy_acc

    def measure_option(o: Option):
        model = sn.extract(o.item[0].mask, task).cpu()
        log(f"  measuring {o.label} end to end on {profile.name}")
        return (measure or budget.measure)(model)  # default: fresh processes, the slowest

    with torch.no_grad():
        best = select(
            options,
            budget,
            predict=predict,
            memory=memory,
            measure=measure_option,
            score=score,
            log=log,
            what="assembly",
            describe=lambda o: f" ({sum(o.item[0].mask)}/{len(o.item[0].mask)} modules on)",
        )
        model = recalibrate(sn.extract(best.item[0].mask, task).cpu(), bn_images).eval()
    t1 = time.perf_counter()
    return Customized(
        model,
        task,
        best.item[0],
        best,
        options,
        {
            "generate_s": round(t_gen - t0, 4),
            "predictor_table_s": round(t_lut - t_gen, 4),
            "predictor_entries_measured": lut_measured,
            "customize_s": round(t1 - t0, 4),
        },
    )


def recalibrate(model: CifarResNet, images: torch.Tensor | None, batch_size: int = 128):
    """``model`` with every BatchNorm's running statistics re-estimated on ``images`` (reset,
    train-mode forwards without gradients, cumulative average, then eval): the statistics of
    this assembly on the task instead of the supernet's, shared by every mask and every task.
    Gradient-free and label-free; ``None`` or no image: ``model`` unchanged."""
    if images is None or len(images) == 0:
        return model
    recalibrate_batchnorm(
        model, [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    )
    return model.eval()


def _proxy_set(dm, split: str, task: Task, n: int, seed: int):
    """``n`` images of the task's classes from ``split`` (seeded), normalised, original labels."""
    if split == "test":
        raise ValueError(
            "nnfactory.proxy_split=test would rank on the test images; use val or train"
        )
    x, y = dm.split_tensors(split)
    idx = torch.nonzero(torch.isin(y, torch.tensor(task))).flatten()
    if len(idx) == 0:
        raise ValueError(
            f"the {split} split holds no image of the task's classes; choose "
            "nnfactory.proxy_split=val or train"
        )
    pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n]]
    return dm.transform_batch(x[pick]), y[pick]


@register_customizer("nnfactory")
def run_nnfactory(cfg: DictConfig) -> dict:
    """``metamorph-customize method=nnfactory``: see the module docstring."""
    from metamorph.runtime.data import build_datamodule

    t_all = time.perf_counter()
    ncfg: NNFactoryCustomizeConfig = typed(
        NNFactoryCustomizeConfig, cfg.get("nnfactory"), "nnfactory"
    )
    if not ncfg.factory:
        raise ValueError(
            "nnfactory.factory= is required: the factory.json task=nnfactory_assembler wrote"
        )
    budget = Budget.from_config(cfg.get("budget"), cfg.get("device"))
    if not budget.active:
        raise ValueError(
            "the budget sets no limit: give budget.max_latency_ms, max_flops, max_params or "
            "max_memory_mb (e.g. budget.max_latency_ms=0.5 device=cpu1_b1)"
        )
    raw_task = cfg.get("classes")
    if raw_task is not None and not isinstance(raw_task, str):
        raw_task = list(OmegaConf.to_container(raw_task, resolve=True))
    t_load = time.perf_counter()
    factory = load_factory(ncfg.factory)
    task = parse_task(
        raw_task, factory.classes, factory.split.min_classes, factory.split.max_classes
    )
    out = Path(str(cfg.out)) if cfg.get("out") else None
    if out is None:
        raise ValueError("out= is required: the path prefix of the model files to write")
    dm = build_datamodule(cfg.data, seed=int(cfg.seed))
    dm.setup("fit")
    dm.set_normalization(factory.supernet.arch.mean, factory.supernet.arch.std)
    if dm.num_classes != factory.supernet.arch.num_classes:
        raise ValueError(
            f"the data has {dm.num_classes} classes but the factory {factory.supernet.arch.num_classes}"
        )
    proxy = _proxy_set(dm, ncfg.proxy_split, task, ncfg.proxy_images, int(cfg.seed))
    bn_images = None
    if ncfg.bn_images < 0:
        raise ValueError(f"nnfactory.bn_images={ncfg.bn_images} must be 0 (off) or a count")
    if ncfg.bn_images:
        split = "train" if ncfg.proxy_split != "train" else "val"
        bn_images = _proxy_set(dm, split, task, ncfg.bn_images, int(cfg.seed) + 1)[0]
    output_format(cfg)  # a bad format= fails before any work
    load_s = time.perf_counter() - t_load
    names = task_names(task, factory.classes)
    print(
        f"[metamorph-customize] nnfactory task={names} ({'seen' if factory.split.is_seen(task) else 'unseen'}) "
        f"budget: {budget.describe()}"
    )
    res = customize(
        factory,
        task,
        budget,
        proxy,
        ncfg.sparsities,
        ncfg.candidates,
        int(cfg.seed),
        ncfg.rank_top,
        log=print,
        bn_images=bn_images,
    )
    c, o = res.chosen, res.option
    summary: dict = {
        "method": "nnfactory",
        "task": names,
        "seen": factory.split.is_seen(task),
        "budget": budget.to_dict(),
        "sparsity": c.sparsity,
        "candidate": c.label,
        "modules_on": int(sum(c.mask)),
        "modules": len(c.mask),
        "hidden": res.model.arch.hidden,
        "params": o.params,
        "flops": o.flops,
        "proxy_acc": c.proxy_acc,
        "predicted_latency_ms": None if o.predicted_ms is None else round(o.predicted_ms, 4),
        "measured_latency_ms": None if o.measured is None else round(o.measured.latency_ms, 4),
        "measured_latency_iqr_ms": None
        if o.measured is None
        else round(o.measured.latency.iqr_ms, 4),
        "candidates": len(res.options),
        "bn_images": 0 if bn_images is None else int(len(bn_images)),
        "customize_s": res.timings["customize_s"],
        "predictor_entries_measured": res.timings["predictor_entries_measured"],
        "predictor_table_s": res.timings["predictor_table_s"],
        "load_s": round(load_s, 3),
    }
    if ncfg.eval_test:
        xt, yt = dm.split_tensors("test")
        xt, yt = filter_to_task(xt, yt, task)  # labels now 0..k-1: the model's own classes
        local = tuple(range(len(task)))
        batches = [
            (dm.transform_batch(xt[i : i + 500]), yt[i : i + 500]) for i in range(0, len(yt), 500)
        ]
        acc = task_accuracy(res.model, batches, local, restricted=True)
        summary["test_task_acc"] = round(acc, 2)
        summary["test_images"] = int(len(yt))
    summary["wall_s"] = round(time.perf_counter() - t_all, 3)
    meta = {"nnfactory": {k: v for k, v in summary.items() if k != "hidden"}, "classes": names}
    meta["nnfactory"]["mask"] = list(c.mask)
    meta["nnfactory"]["factory"] = str(ncfg.factory)
    report = {**summary, "options": [x.to_dict() for x in res.options]}
    files = write_customized(res.model, out, meta, report, cfg, names)
    summary.update(files)
    print(
        f"[metamorph-customize] {c.label}: {summary['modules_on']}/{summary['modules']} modules, "
        f"measured {summary['measured_latency_ms']} ms; customization {res.timings['customize_s']:.2f} s, "
        f"whole command {summary['wall_s']:.2f} s"
    )
    return summary
