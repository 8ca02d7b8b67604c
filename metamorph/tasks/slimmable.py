"""``metamorph-train task=slimmable``: universally slimmable training of a CIFAR ResNet over the
metamorphic blocks' hidden width (the Slimmable baseline of NeuMeta's Table 2).

Per step (sandwich rule): the largest width on the labels, the smallest and ``num_random`` others
on the largest's soft predictions (in-place distillation); the network before the first
slimmable block runs once per step and its gradient is the sum over the widths. Before each
validation the BN statistics of every reported width are re-estimated on a few training batches;
after training on ``calib_batches`` of them, stored in the checkpoint (``slimmable.ckpt``) and used
for the test sweep and the exported per-width model files.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from omegaconf import DictConfig, OmegaConf

from metamorph.baselines.slimmable import (
    SandwichSampler,
    SlimmableConfig,
    SlimmableResNet,
    shape_key,
    sort_hidden_channels,
)
from metamorph.config.schema import OptimConfig, SchedulerConfig, typed
from metamorph.data.transforms import random_crop_flip
from metamorph.models.distill import soft_cross_entropy
from metamorph.models.resnet_cifar import CifarResNet, ResNetArch
from metamorph.runtime.checkpoints import KIND_KEY, load_task_checkpoint, register_checkpoint_kind
from metamorph.runtime.data import build_datamodule
from metamorph.runtime.networks import build_model
from metamorph.runtime.summary import plain
from metamorph.runtime.tasks import register_task
from metamorph.runtime.trainer import build_trainer, callback_metric
from metamorph.tasks.optim import lightning_optimizers

CKPT_KEY = "slimmable_bn_stats"


def gamma_label(g: float) -> str:
    return f"g{float(g):g}"


def slimmable_config(
    task: DictConfig | dict,
) -> tuple[SlimmableConfig, OptimConfig, SchedulerConfig]:
    """Validate ``task`` (typos fail with the list of valid keys)."""
    t = OmegaConf.to_container(task, resolve=True) if isinstance(task, DictConfig) else dict(task)
    t = dict(t)
    t.pop("name", None)
    optim = typed(OptimConfig, t.pop("optim", None), "task.optim")
    sched = typed(SchedulerConfig, t.pop("scheduler", None), "task.scheduler")
    return typed(SlimmableConfig, t, "task"), optim, sched


class SlimmableModule(L.LightningModule):
    """Sandwich-rule training of a :class:`SlimmableResNet` with in-place distillation."""

    def __init__(
        self,
        net: SlimmableResNet,
        cfg: SlimmableConfig,
        optim: OptimConfig,
        scheduler: SchedulerConfig,
        hparams: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.optim_cfg = optim
        self.sched_cfg = scheduler
        net.trained_ratios = (min(cfg.train_widths), max(cfg.train_widths))
        self.sampler = SandwichSampler(
            cfg.train_widths,
            cfg.num_random,
            cfg.random_mode,
            seed=seed,
            full=max(net.full_width(b) for b in net.blocks),
        )
        self.save_hyperparameters(
            {
                "config": hparams or {},
                "slimmable": asdict(cfg),
                "base_arch": net.net.arch.to_dict(),
                "seed": int(seed),
            },
            logger=True,
        )
        n = net.net.arch.num_classes
        self.labels = [gamma_label(g) for g in cfg.eval_gammas]
        self.val_accs = torch.nn.ModuleDict(
            {
                lb.replace(".", "_"): torchmetrics.classification.MulticlassAccuracy(
                    n, average="micro"
                )
                for lb in self.labels
            }
        )
        self.test_accs = torch.nn.ModuleDict(
            {
                lb.replace(".", "_"): torchmetrics.classification.MulticlassAccuracy(
                    n, average="micro"
                )
                for lb in self.labels
            }
        )
        self.last_ratios: list[float] = []
        self._eval_nets: dict[str, CifarResNet] = {}

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        x, y = batch
        cfg = self.cfg
        ratios = self.sampler(self.global_step)
        self.last_ratios = ratios
        h = self.net.features(x)
        logits = self.net.forward_from(h, self.net.shape_for_ratio(ratios[0]))
        ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        loss = ce
        if len(ratios) > 1:
            soft = F.softmax(logits.detach() / cfg.kd_temperature, dim=1)
            sub = 0.0
            for r in ratios[1:]:
                out = self.net.forward_from(h, self.net.shape_for_ratio(r))
                if cfg.inplace_distill:
                    sub = sub + soft_cross_entropy(out, soft, cfg.kd_temperature)
                else:
                    sub = sub + F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
            loss = loss + sub
            self.log("train/sub_loss", sub / (len(ratios) - 1), on_step=True, on_epoch=False)
        self.log("train/ce_max", ce, on_step=True, on_epoch=False)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # ------------------------------------------------------------------ BN recalibration
    def calibration_batches(self, n: int, dm=None, seed: int = 0):
        """``n`` normalized training batches of ``dm`` (default: the trainer's data module),
        crop+flip augmented with a fixed seed when ``calib_augment``; ``None`` when there is
        none."""
        if dm is None and self._trainer is not None:
            dm = self.trainer.datamodule
        if dm is None or n <= 0:
            return None
        bs = self.cfg.calib_batch_size or dm.batch_size
        x, y = dm.subset("train", n * bs, seed=seed)
        if self.cfg.calib_augment:
            g = torch.Generator().manual_seed(seed)
            x = random_crop_flip(x, padding=dm.padding, generator=g)
        return list(dm.normalized_batches((x, y), batch_size=bs, device=self.device))

    @torch.no_grad()
    def calibrate_all(self, batches, gammas=None) -> dict[str, float]:
        """Recalibrate BN at every ``gammas`` (default ``eval_gammas``); returns seconds per width."""
        times = {}
        for g in self.cfg.eval_gammas if gammas is None else gammas:
            t0 = time.time()
            self.net.calibrate(self.net.shape_for_gamma(g), batches)
            times[gamma_label(g)] = round(time.time() - t0, 2)
        return times

    def _prepare_eval_nets(self, n_calib: int, recalibrate: bool) -> None:
        batches = None
        self._eval_nets = {}
        for g, lb in zip(self.cfg.eval_gammas, self.labels):
            hidden = self.net.shape_for_gamma(g)
            if recalibrate or not self.net.is_calibrated(hidden):
                if batches is None:
                    batches = self.calibration_batches(n_calib)
                if batches:
                    self.net.calibrate(hidden, batches)
            self._eval_nets[lb] = self.net.materialize(hidden)

    def _eval_step(self, batch, metrics, stage: str) -> None:
        x, y = batch
        for lb, net in self._eval_nets.items():
            m = metrics[lb.replace(".", "_")]
            m(net(x), y)
            self.log(f"{stage}/acc@{lb}", m, on_epoch=True, add_dataloader_idx=False)
        full = metrics[self.labels[0].replace(".", "_")] if self.cfg.eval_gammas[0] == 0 else None
        if full is not None:
            self.log(f"{stage}/acc", full, on_epoch=True, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._prepare_eval_nets(self.cfg.val_calib_batches, recalibrate=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_accs, "val")

    def on_test_epoch_start(self) -> None:
        self._prepare_eval_nets(self.cfg.calib_batches, recalibrate=False)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_accs, "test")

    def subnet_family(self, k: int | None = None, seed: int = 0, data=None) -> SlimmableResNet:
        """The slimmable network as a sub-network family; with ``data`` (a data module), widths
        without stored BN statistics are recalibrated on ``calib_batches`` of its training
        batches (crop+flip augmented when ``calib_augment``) before they are evaluated."""
        if data is not None:
            self.net.calibration_source = lambda: self.calibration_batches(
                self.cfg.calib_batches, dm=data, seed=seed
            )
        return self.net

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[KIND_KEY] = "slimmable"
        checkpoint[CKPT_KEY] = {
            k: {n: t.detach().cpu() for n, t in v.items()} for k, v in self.net.calibrated.items()
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.net.calibrated = {
            k: {n: t.clone() for n, t in v.items()} for k, v in checkpoint.get(CKPT_KEY, {}).items()
        }

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        return lightning_optimizers(self, self.net.parameters(), self.optim_cfg, self.sched_cfg)


@register_task("slimmable")
def run_slimmable(cfg: DictConfig) -> dict:
    """Train, recalibrate, test and export; returns the run summary (also ``summary.json``)."""
    from metamorph.io.model_file import save_model
    from metamorph.utils.profile import count_params

    t0 = time.time()
    L.seed_everything(cfg.seed, workers=True)
    scfg, optim, sched = slimmable_config(cfg.task)
    dm = build_datamodule(cfg.data, seed=cfg.seed)
    dm.prepare_data()
    dm.setup("fit")
    base = build_model(cfg.model, num_classes=dm.num_classes)
    if not isinstance(base, CifarResNet):
        raise ValueError(
            f"task=slimmable needs a CIFAR ResNet (model=resnet20/32/44/56/110), got "
            f"{type(base).__name__} from model={cfg.model.name}"
        )
    dm.set_normalization(base.arch.mean, base.arch.std)
    if scfg.reorder == "l1":
        sort_hidden_channels(base.eval(), scfg.blocks)
    slim = SlimmableResNet(base.train(), scfg.blocks)
    module = SlimmableModule(slim, scfg, optim, sched, hparams=plain(cfg), seed=int(cfg.seed))
    trainer = build_trainer(cfg)
    out_dir = Path(cfg.paths.output_dir)
    print(
        f"[metamorph-train] task=slimmable blocks={slim.blocks} widths={scfg.train_widths} "
        f"params={count_params(base):,} -> {out_dir}"
    )
    summary: dict = {
        "task": "slimmable",
        "model": cfg.model.name,
        "init": cfg.model.init,
        "blocks": slim.blocks,
        "output_dir": str(out_dir),
    }
    if cfg.train:
        t_fit = time.time()
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
        summary["train_time_s"] = round(time.time() - t_fit, 1)
        summary["val/acc"] = callback_metric(trainer, "val/acc")
        summary["global_step"] = trainer.global_step
    module = module.to(trainer.strategy.root_device)
    t_cal = time.time()
    batches = module.calibration_batches(scfg.calib_batches, dm=dm)
    if batches:
        module.calibrate_all(batches)
    summary["calib_time_s"] = round(time.time() - t_cal, 1)
    if cfg.test:
        trainer.test(module, datamodule=dm, verbose=False, weights_only=True)
        summary["test/acc"] = callback_metric(trainer, "test/acc")
        summary["test_sweep"] = {}  # accuracy (%) per compression ratio
        for lb in module.labels:
            acc = callback_metric(trainer, f"test/acc@{lb}")
            summary["test_sweep"][lb] = None if acc is None else round(100 * acc, 2)
        if trainer.is_global_zero:
            print("\nTest accuracy of the slimmable network (BN recalibrated per width):")
            print("| gamma | widths | acc (%) |\n|---|---|---|")
            for g, lb in zip(scfg.eval_gammas, module.labels):
                acc = summary["test_sweep"][lb]
                w = [slim.shape_for_gamma(g)[s][b] for s, b in map(_sb, slim.blocks)]
                print(f"| {g:g} | {w} | {'n/a' if acc is None else f'{acc:.2f}'} |")
    if trainer.is_global_zero and not trainer.fast_dev_run:
        out_dir.mkdir(parents=True, exist_ok=True)
        if trainer.lightning_module is not None:  # attached by fit or test
            ckpt = out_dir / "slimmable.ckpt"
            trainer.save_checkpoint(ckpt, weights_only=False)
            summary["checkpoint"] = str(ckpt)
        models = {}
        (out_dir / "models").mkdir(parents=True, exist_ok=True)
        for g in scfg.eval_gammas:
            net = slim.materialize(slim.shape_for_gamma(g)).cpu()
            meta = {"name": cfg.name, "gamma": g, "source": "slimmable"}
            models[gamma_label(g)] = str(
                save_model(net, out_dir / "models" / f"slimmable_g{round(100 * g)}", meta=meta)
            )
        summary["models"] = models
        if cfg.export_to and trainer.lightning_module is not None:
            Path(cfg.export_to).parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(cfg.export_to) + ".ckpt", weights_only=False)
            summary["exported"] = str(cfg.export_to) + ".ckpt"
    summary["time_s"] = round(time.time() - t0, 1)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _sb(block: str) -> tuple[int, int]:
    s, b = block.removeprefix("layer").split(".")
    return int(s) - 1, int(b)


def _is_slimmable(obj: dict) -> bool:
    hp = obj.get("hyper_parameters") or {}
    return isinstance(hp, dict) and "slimmable" in hp and "base_arch" in hp


@register_checkpoint_kind("slimmable", sniff=_is_slimmable)
def load_slimmable_checkpoint(path: str | Path, map_location: str = "cpu") -> SlimmableModule:
    """Rebuild a trained :class:`SlimmableModule` (with its per-width BN statistics) from its
    checkpoint, loaded with ``weights_only=True``."""
    ckpt, hp = load_task_checkpoint(path, "slimmable", "slimmable", map_location)
    scfg = SlimmableConfig(**hp["slimmable"])
    task = (hp.get("config") or {}).get("task", {}) or {}
    optim = typed(OptimConfig, task.get("optim"), "task.optim")
    sched = typed(SchedulerConfig, task.get("scheduler"), "task.scheduler")
    net = SlimmableResNet(CifarResNet(ResNetArch.from_dict(dict(hp["base_arch"]))), scfg.blocks)
    module = SlimmableModule(
        net, scfg, optim, sched, hparams=hp.get("config"), seed=hp.get("seed", 0)
    )
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if unexpected or [m for m in missing if m.startswith("net.")]:
        raise ValueError(
            f"{path} does not match its own configuration: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    module.on_load_checkpoint(ckpt)
    return module.eval()


__all__ = [
    "SlimmableModule",
    "load_slimmable_checkpoint",
    "run_slimmable",
    "shape_key",
    "slimmable_config",
]
