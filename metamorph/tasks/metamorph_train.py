"""``metamorph-train task=metamorph``: prepare a pretrained network, train its metamorphic INR."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from metamorph.callbacks.ratio_sweep import RatioSweep
from metamorph.config.schema import OptimConfig, SchedulerConfig, typed
from metamorph.hypernet.compiled import CompileConfig
from metamorph.hypernet.inr import INRConfig
from metamorph.hypernet.metanet import MetaResNet, MetaSpec, block_names
from metamorph.hypernet.sampling import SamplingConfig
from metamorph.io.model_file import save_model
from metamorph.models import fold_batchnorm, insert_batchnorm
from metamorph.models.resnet_cifar import CifarResNet, ResNetArch
from metamorph.runtime.checkpoints import load_task_checkpoint, register_checkpoint_kind
from metamorph.runtime.data import build_datamodule
from metamorph.runtime.networks import load_any_model
from metamorph.runtime.summary import plain
from metamorph.runtime.tasks import register_task
from metamorph.runtime.trainer import build_trainer, callback_metric
from metamorph.tasks.metamorph import LossConfig, MetamorphConfig, MetamorphModule, ScheduleConfig

PREPARE_KEYS = {
    "fold_bn",
    "permute",
    "tsp_time_limit",
    "hidden_order",
    "bn_strategy",
    "bn_init",
    "bn_scale",
    "bn_calibration_images",
}


def metamorph_config(cfg: DictConfig) -> MetamorphConfig:
    """Validate ``task`` + ``hypernet`` against their schemas (typos fail loudly)."""
    t = cfg.task
    known = {
        "name",
        "base",
        "prepare",
        "scope",
        "sampling",
        "loss",
        "coord_noise",
        "noise_quirk",
        "ema_decay",
        "ema_shared",
        "eval_k",
        "shared",
        "shared_lr_factor",
        "shared_optim",
        "shared_optim_params",
        "recon_warmup_steps",
        "reset_optimizer_after_warmup",
        "lr_ramp_steps",
        "post_warmup_lr_factor",
        "optim",
        "scheduler",
        "sweep",
        "schedule",
        "share_prefix",
        "coord_noise_mode",
        "log_every_n_steps",
        "compile",
    }
    unknown = set(t.keys()) - known
    if unknown:
        raise ValueError(
            f"invalid config `task`: unknown keys {sorted(unknown)}; valid: {sorted(known)}"
        )
    bad = set((t.get("prepare") or {}).keys()) - PREPARE_KEYS
    if bad:
        raise ValueError(
            f"invalid config `task.prepare`: unknown keys {sorted(bad)}; valid: {sorted(PREPARE_KEYS)}"
        )
    return MetamorphConfig(
        spec=typed(MetaSpec, t.scope, "task.scope"),
        inr=typed(INRConfig, cfg.hypernet, "hypernet"),
        sampling=typed(SamplingConfig, t.sampling, "task.sampling"),
        loss=typed(LossConfig, t.loss, "task.loss"),
        optim=typed(OptimConfig, t.optim, "task.optim"),
        scheduler=typed(SchedulerConfig, t.scheduler, "task.scheduler"),
        coord_noise=float(t.coord_noise),
        noise_quirk=bool(t.noise_quirk),
        ema_decay=float(t.ema_decay),
        ema_shared=bool(t.get("ema_shared", False)),
        eval_k=int(t.eval_k),
        shared=list(t.shared),
        shared_lr_factor=float(t.get("shared_lr_factor", 1.0)),
        shared_optim=(
            typed(OptimConfig, t.shared_optim, "task.shared_optim")
            if t.get("shared_optim") is not None
            else None
        ),
        shared_optim_params=[str(x) for x in t.get("shared_optim_params", ["*"])],
        recon_warmup_steps=int(t.recon_warmup_steps),
        reset_optimizer_after_warmup=bool(t.get("reset_optimizer_after_warmup", False)),
        lr_ramp_steps=int(t.get("lr_ramp_steps", 0)),
        post_warmup_lr_factor=float(t.get("post_warmup_lr_factor", 1.0)),
        schedule=typed(ScheduleConfig, t.get("schedule"), "task.schedule"),
        share_prefix=bool(t.get("share_prefix", True)),
        coord_noise_mode=str(t.get("coord_noise_mode", "query")),
        log_every_n_steps=int(t.get("log_every_n_steps", 1)),
        compile=typed(CompileConfig, t.get("compile"), "task.compile"),
        seed=int(cfg.seed),
    )


def prepare_base(
    model: CifarResNet, fold: bool, permute: bool, time_limit: float, hidden_order: str = "smooth"
) -> tuple[CifarResNet, dict]:
    """Fold BN and permute channels for smoothness; returns the network and a report.

    ``hidden_order="importance"`` then re-sorts every block's hidden channels by descending L1
    norm (function-preserving), so that keeping the first d channels is L1 pruning.
    """
    from metamorph.hypernet.permute import (
        apply_permutations,
        channel_groups,
        importance_orders,
        permute_for_smoothness,
        total_variation,
    )

    if hidden_order not in ("smooth", "importance"):
        raise ValueError(f"prepare.hidden_order={hidden_order!r}; choose smooth or importance")
    report: dict = {}
    model = model.eval()
    if fold:
        fold_batchnorm(model)
    if permute:
        t0 = time.time()
        report["tv_before"] = float(total_variation(model))
        model, _ = permute_for_smoothness(model, time_limit=time_limit)
        report["tv_after"] = float(total_variation(model))
        report["permute_s"] = round(time.time() - t0, 2)
    if hidden_order == "importance":
        apply_permutations(model, channel_groups(model), importance_orders(model))
        report["tv_importance_order"] = float(total_variation(model))
    return model, report


BN_STRATEGIES = ("fold", "keep", "skipinit", "scaled_shortcut", "learnable_shortcut")


def apply_bn_strategy(
    model: CifarResNet,
    blocks: list[str],
    strategy: str,
    init: str = "paper",
    images: torch.Tensor | None = None,
    bn_scale: str = "identity",
) -> CifarResNet:
    """Rebuild a folded network with the block variant ``strategy`` in ``blocks``.

    ``fold`` (NeuMeta) leaves the network as it is; ``keep`` gives the metamorphic blocks a
    BatchNorm after each conv again, initialised to the identity on ``images`` (normalized
    training images; :func:`metamorph.models.insert_batchnorm`), trained with batch statistics
    and recalibrated per shape for evaluation (``bn_scale``: the conv weights' scale,
    :func:`~metamorph.models.insert_batchnorm`); the others are the BN-replacement strategies
    of Sommariva et al. (SkipInit alpha init 0, fixed or learnable shortcut scaling), applied to the
    metamorphic blocks only. ``init="paper"``: new scalars start at the paper's init (alpha 0,
    shortcut scale 1), which changes a pretrained network's function (the folded fine-tuned
    ResNet-20 falls to ~11% with every block converted); ``init="preserve"`` keeps the function:
    SkipInit alpha 1, learnable shortcut s = sqrt(2) with conv2's weight and bias times sqrt(2)
    (fixed shortcut scaling cannot be made function-preserving and is refused).
    """
    if init not in ("paper", "preserve"):
        raise ValueError(f"prepare.bn_init={init!r}; choose paper or preserve")
    if init == "preserve" and strategy == "scaled_shortcut":
        raise ValueError(
            "prepare.bn_init=preserve cannot keep the function with scaled_shortcut (the fixed "
            "sqrt(0.5) also scales the shortcut); use learnable_shortcut or bn_init=paper"
        )
    if strategy not in BN_STRATEGIES:
        raise ValueError(f"prepare.bn_strategy={strategy!r}; choose one of {BN_STRATEGIES}")
    if strategy == "fold":
        return model
    if model.arch.bn:
        raise ValueError(f"bn_strategy={strategy} needs prepare.fold_bn=true")
    if strategy == "keep":
        if images is None:
            raise ValueError(
                "bn_strategy=keep needs training images to initialise the kept BatchNorm"
            )
        return insert_batchnorm(model, blocks, images, scale=bn_scale)
    arch = ResNetArch.from_dict(model.arch.to_dict())
    arch.block_variants = {**arch.block_variants, **{b: strategy for b in blocks}}
    new = CifarResNet(arch)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not m.endswith(("alpha", "shortcut_scale")) for m in missing):
        raise RuntimeError(
            f"bn_strategy rebuild mismatch: missing {missing}, unexpected {unexpected}"
        )
    if init == "preserve":
        with torch.no_grad():
            for b in blocks:
                blk = new.get_submodule(b)
                if strategy == "skipinit":
                    blk.alpha.fill_(1.0)
                elif strategy == "learnable_shortcut":
                    root2 = math.sqrt(2.0)
                    blk.shortcut_scale.fill_(root2)
                    blk.conv2.weight.mul_(root2)
                    blk.conv2.bias.mul_(root2)
    return new.eval()


@register_task("metamorph")
def run_metamorph(cfg: DictConfig) -> dict:
    t0 = time.time()
    L.seed_everything(cfg.seed, workers=True)
    mcfg = metamorph_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    base_path = cfg.task.base
    if (
        not base_path
        or not Path(base_path).with_suffix(".json").exists()
        and not Path(base_path).exists()
    ):
        raise FileNotFoundError(
            f"task.base={base_path} not found: fine-tune a network first "
            "(metamorph-train experiment=finetune/resnet20_cifar10 ...) or point task.base at a model file"
        )
    base = load_any_model(base_path)
    if not isinstance(base, CifarResNet):
        raise ValueError(
            f"task.base={base_path} is a {type(base).__name__}: task=metamorph makes CIFAR "
            "ResNets metamorphic (a model file of the resnet20/32/44/56/110 family)"
        )
    p = cfg.task.prepare
    prepared, prep_report = prepare_base(
        base, p.fold_bn, p.permute, p.tsp_time_limit, p.get("hidden_order", "smooth")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = prepared if mcfg.loss.kd > 0 else None  # the prepared network, before any strategy
    scope = block_names(prepared.arch) if mcfg.spec.blocks in (["all"], "all") else mcfg.spec.blocks
    dm = build_datamodule(cfg.data, mean=prepared.arch.mean, std=prepared.arch.std, seed=cfg.seed)
    dm.setup("fit")
    strategy = p.get("bn_strategy", "fold")
    calib = None
    if strategy == "keep":  # BN statistics: identity init now, per-shape evaluation later
        calib, _ = dm.subset("train", int(p.get("bn_calibration_images", 1024)), seed=cfg.seed)
    prepared = apply_bn_strategy(
        prepared,
        list(scope),
        strategy,
        p.get("bn_init", "paper"),
        images=None if calib is None else dm.transform_batch(calib),
        bn_scale=p.get("bn_scale", "identity"),
    )
    save_model(prepared, out_dir / "prepared", meta={"source": str(base_path), **prep_report})
    net = MetaResNet(prepared, mcfg.spec, mcfg.inr, shared=mcfg.shared)
    if calib is not None:
        net.set_bn_calibration(calib)
    module = MetamorphModule(net, mcfg, teacher=teacher, hparams=plain(cfg))
    sw = cfg.task.sweep
    sweep = RatioSweep(
        gammas=list(sw.gammas),
        depths=list(sw.depths),
        widths_above=list(sw.widths_above),
        random_shapes=sw.random_shapes,
        k=sw.k,
        every_n_epochs=sw.every_n_epochs,
        max_batches=sw.max_batches,
    )
    trainer = build_trainer(cfg, extra_callbacks=[sweep])
    n_inr = sum(p_.numel() for p_ in net.inr.parameters())
    print(
        f"[metamorph-train] task=metamorph base={base_path} blocks={net.meta_blocks} "
        f"INR params={n_inr:,} prep={json.dumps(prep_report)} -> {out_dir}"
    )
    summary: dict = {
        "task": "metamorph",
        "output_dir": str(out_dir),
        "inr_params": n_inr,
        **prep_report,
    }
    if cfg.train:
        t_fit, step0 = time.time(), trainer.global_step
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
        fit_s = time.time() - t_fit
        summary["val/acc"] = callback_metric(trainer, "val/acc")
        summary["global_step"] = trainer.global_step
        summary["fit_s"] = round(fit_s, 1)
        summary["steps_per_s"] = round((trainer.global_step - step0) / max(fit_s, 1e-9), 2)
    if cfg.test:
        trainer.test(module, datamodule=dm, verbose=False, weights_only=True)
        summary["test/acc"] = callback_metric(trainer, "test/acc")
        summary["test_sweep"] = {pt.label: round(pt.acc, 2) for pt in sweep.last}
        if trainer.is_global_zero:
            print(
                f"\nTest accuracy across shapes (EMA, K={mcfg.eval_k if sw.k is None else sw.k}):"
            )
            print(sweep.last_table)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        ckpt = out_dir / "metamorph.ckpt"
        trainer.save_checkpoint(ckpt, weights_only=False)
        summary["checkpoint"] = str(ckpt)
        if cfg.export_to:
            Path(cfg.export_to).parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(cfg.export_to) + ".ckpt", weights_only=False)
            summary["exported"] = str(cfg.export_to) + ".ckpt"
    summary["time_s"] = round(time.time() - t0, 1)
    return summary


def _is_metamorph(obj: dict) -> bool:
    hp = obj.get("hyper_parameters") or {}
    return isinstance(hp, dict) and "metamorph" in hp and "base_arch" in hp


@register_checkpoint_kind("metamorph", sniff=_is_metamorph)
def load_metamorph_checkpoint(path: str | Path, map_location: str = "cpu") -> MetamorphModule:
    """Rebuild a trained :class:`MetamorphModule` from its checkpoint with ``weights_only=True``."""
    ckpt, hp = load_task_checkpoint(path, "metamorph", "metamorphic", map_location)
    cfg = OmegaConf.create(hp["config"])
    mcfg = metamorph_config(cfg)
    base = CifarResNet(ResNetArch.from_dict(dict(hp["base_arch"])))
    net = MetaResNet(base, mcfg.spec, mcfg.inr, shared=mcfg.shared)
    module = MetamorphModule(net, mcfg, hparams=hp["config"])
    # the distillation teacher (task.loss.kd > 0) is a copy of the frozen base: not needed to emit
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("teacher.")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    # teacher.*: distillation teacher, not needed to emit; net.block_active: absent from
    # checkpoints written before block schedules existed (every scoped block is then active)
    missing = [m for m in missing if not m.startswith("teacher.") and m != "net.block_active"]
    if unexpected or missing:
        raise ValueError(
            f"{path} does not match its own configuration: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return module.eval()
