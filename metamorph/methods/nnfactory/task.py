"""``metamorph-train task=nnfactory_supernet`` and ``task=nnfactory_assembler``: NN-Factory's two
one-time training stages, and their checkpoint kinds.

Stage 1 writes ``supernet.json/.safetensors`` (a model file whose ``meta.nnfactory`` names the
groups, the task split and the classes); stage 2 reads it (``task.supernet=``) and writes
``factory.json/.safetensors`` (supernet + assembler), what ``metamorph-customize`` loads.
Both resume from ``ckpt_path=.../checkpoints/last.ckpt`` like every task.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from metamorph.config.schema import typed
from metamorph.io.model_file import save_model
from metamorph.methods.nnfactory.assembler import MASK_MODES, Assembler
from metamorph.methods.nnfactory.class_tasks import CIFAR10_CLASSES, TaskSplit
from metamorph.methods.nnfactory.config import AssemblerConfig, SupernetConfig
from metamorph.methods.nnfactory.factory import (
    Factory,
    load_supernet_file,
    save_factory,
    supernet_meta,
)
from metamorph.methods.nnfactory.module import (
    ASSEMBLER_KIND,
    SUPERNET_KIND,
    AssemblerModule,
    SupernetModule,
)
from metamorph.methods.nnfactory.supernet import ModularSupernet
from metamorph.models.resnet_cifar import CifarResNet
from metamorph.runtime.checkpoints import read_checkpoint, register_checkpoint_kind, submodule_state
from metamorph.runtime.data import build_datamodule
from metamorph.runtime.networks import build_model
from metamorph.runtime.summary import plain
from metamorph.runtime.tasks import register_task
from metamorph.runtime.trainer import fit_and_test


def _classes(dm) -> list[str]:
    names = list(dm.classes)
    return names if names else list(CIFAR10_CLASSES)


def _fit_and_test(cfg: DictConfig, module: L.LightningModule, dm, summary: dict) -> L.Trainer:
    trainer = fit_and_test(cfg, module, dm, summary, metric="task_acc")
    summary["unseen_tasks_trained"] = len(
        [t for t in module.trained_tasks if not module.split.is_seen(t)]
    )
    return trainer


@register_task("nnfactory_supernet")
def run_supernet(cfg: DictConfig) -> dict:
    """Stage 1: fine-tune the modular supernet with random (seen task, module mask) pairs."""
    t0 = time.time()
    L.seed_everything(cfg.seed, workers=True)
    tc: SupernetConfig = typed(SupernetConfig, cfg.task, "task")
    dm = build_datamodule(cfg.data, seed=cfg.seed)
    dm.prepare_data()
    dm.setup("fit")
    net = build_model(cfg.model, num_classes=dm.num_classes)
    if not isinstance(net, CifarResNet):
        raise ValueError(
            f"task=nnfactory_supernet needs a CifarResNet (model.init: a CIFAR ResNet model file); "
            f"got {type(net).__name__}"
        )
    dm.set_normalization(net.arch.mean, net.arch.std)
    split = TaskSplit(dm.num_classes, **vars(tc.split))
    supernet = ModularSupernet(net.train(), tc.groups)
    teacher = copy.deepcopy(net).eval()
    module = SupernetModule(
        supernet, teacher, split, tc, seed=int(cfg.seed), hparams={"config": plain(cfg)}
    )
    out_dir = Path(cfg.paths.output_dir)
    print(
        f"[metamorph-train] task=nnfactory_supernet modules={supernet.num_modules} "
        f"(groups={tc.groups}) seen/unseen tasks={len(split.seen)}/{len(split.unseen)} -> {out_dir}"
    )
    summary: dict = {
        "task": "nnfactory_supernet",
        "init": cfg.model.init,
        "modules": supernet.num_modules,
        "seen_tasks": len(split.seen),
        "unseen_tasks": len(split.unseen),
        "output_dir": str(out_dir),
    }
    trainer = _fit_and_test(cfg, module, dm, summary)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        meta = {**supernet_meta(supernet, split, _classes(dm)), "name": cfg.name}
        summary["model_file"] = str(
            save_model(supernet.net.eval().cpu(), out_dir / "supernet", meta=meta)
        )
        if cfg.export_to:
            summary["exported"] = str(save_model(supernet.net, cfg.export_to, meta=meta))
    summary["time_s"] = round(time.time() - t0, 1)
    return summary


@register_task("nnfactory_assembler")
def run_assembler(cfg: DictConfig) -> dict:
    """Stage 2: train the assembler G on (seen task, sparsity) with the supernet frozen."""
    t0 = time.time()
    L.seed_everything(cfg.seed, workers=True)
    tc: AssemblerConfig = typed(AssemblerConfig, cfg.task, "task")
    if not tc.supernet:
        raise ValueError(
            "task.supernet= is required: the supernet model file task=nnfactory_supernet wrote "
            "(<run>/supernet.json)"
        )
    if tc.mask_mode not in MASK_MODES:
        raise ValueError(f"task.mask_mode={tc.mask_mode!r}; choose one of {MASK_MODES}")
    supernet, split, classes = load_supernet_file(tc.supernet)
    dm = build_datamodule(cfg.data, seed=cfg.seed)
    dm.prepare_data()
    dm.setup("fit")
    if dm.num_classes != supernet.arch.num_classes:
        raise ValueError(
            f"{tc.supernet} has {supernet.arch.num_classes} classes but the data has "
            f"{dm.num_classes}; use the data set the supernet was trained on"
        )
    dm.set_normalization(supernet.arch.mean, supernet.arch.std)
    assembler = Assembler(
        dm.num_classes, supernet.num_modules, tc.hidden, tc.layers, tc.use_task, tc.use_sparsity
    )
    module = AssemblerModule(
        supernet, assembler, split, tc, seed=int(cfg.seed), hparams={"config": plain(cfg)}
    )
    out_dir = Path(cfg.paths.output_dir)
    print(
        f"[metamorph-train] task=nnfactory_assembler modules={supernet.num_modules} "
        f"mask={tc.mask_mode} frozen supernet={tc.freeze_supernet} -> {out_dir}"
    )
    summary: dict = {
        "task": "nnfactory_assembler",
        "supernet": tc.supernet,
        "modules": supernet.num_modules,
        "output_dir": str(out_dir),
    }
    trainer = _fit_and_test(cfg, module, dm, summary)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        factory = Factory(
            supernet.cpu().eval(),
            assembler.cpu().eval(),
            split,
            classes,
            tc.mask_mode,
            tc.tau,
            meta={
                "name": cfg.name,
                "supernet": tc.supernet,
                "val_task_acc": summary.get("val/task_acc"),
            },
        )
        summary["factory"] = str(save_factory(factory, out_dir / "factory"))
        if cfg.export_to:
            summary["exported"] = str(save_factory(factory, cfg.export_to))
    summary["time_s"] = round(time.time() - t0, 1)
    return summary


# ----------------------------------------------------------------------------------------------
# Checkpoint kinds: the Lightning checkpoints of the two stages
# ----------------------------------------------------------------------------------------------


def _stage_network(ckpt: dict) -> CifarResNet:
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    model_cfg = cfg.model
    model_cfg.init = None
    state = submodule_state(ckpt, "supernet.net.")
    arch_net = build_model(model_cfg, num_classes=int(state["fc.weight"].shape[0]))
    arch_net.load_state_dict(state)
    return arch_net.eval()


@register_checkpoint_kind(SUPERNET_KIND)
def load_supernet_checkpoint(path, map_location: str = "cpu") -> ModularSupernet:
    """The supernet of a ``task=nnfactory_supernet`` Lightning checkpoint (``weights_only``)."""
    ckpt = read_checkpoint(path, map_location)
    groups = int(ckpt["hyper_parameters"]["config"]["task"]["groups"])
    return ModularSupernet(_stage_network(ckpt), groups).eval()


@register_checkpoint_kind(ASSEMBLER_KIND)
def load_assembler_checkpoint(path, map_location: str = "cpu") -> Assembler:
    """The assembler of a ``task=nnfactory_assembler`` Lightning checkpoint (``weights_only``)."""
    ckpt = read_checkpoint(path, map_location)
    tc = typed(AssemblerConfig, ckpt["hyper_parameters"]["config"]["task"], "task")
    state = submodule_state(ckpt, "assembler.")
    num_modules, num_classes = state["head.weight"].shape[0], state["body.0.weight"].shape[1] - 1
    a = Assembler(num_classes, num_modules, tc.hidden, tc.layers, tc.use_task, tc.use_sparsity)
    a.load_state_dict(state)
    return a.eval()
