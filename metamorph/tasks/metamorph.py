"""LightningModule training a metamorphic network's INR (``task=metamorph``)."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from metamorph.config.schema import OptimConfig, SchedulerConfig
from metamorph.hypernet.compiled import CompileConfig
from metamorph.hypernet.inr import NOISE_MODES, INRConfig
from metamorph.hypernet.metanet import MetaResNet, MetaSpec, Shape
from metamorph.hypernet.sampling import SamplingConfig, ShapeSampler
from metamorph.models.distill import kl_distillation
from metamorph.models.resnet_cifar import CifarResNet, ResNetArch
from metamorph.tasks.optim import lightning_optimizers, param_group

KD_SOURCES = ("teacher", "full_width")


@dataclass
class LossConfig:
    ce: float = 1.0
    recon: float = 1.0
    # weighted (|w|-weighted MSE, NeuMeta CIFAR-10) | mse | relative (each tensor's MSE divided by
    # its mean square: every tensor counts alike; with plain MSE over a whole network the biases,
    # ~100x larger in mean square than the folded conv weights, take the whole loss)
    recon_type: str = "weighted"
    reg: float = 1e-4  # sum of L2 norms of the emitted tensors
    kd: float = 0.0  # distillation weight
    kd_temperature: float = 4.0
    # teacher: every shape distils from the prepared full network (fixed); full_width: narrower
    # shapes distil from the metamorphic network's own current full-width shape, no gradient
    # through it (a slimmable network's in-place distillation; one extra forward pass per step),
    # and the full width from the teacher
    kd_source: str = "teacher"
    # metamorph option (NeuMeta applies recon only on full-width steps): also fit the full-width
    # emission on every step, whatever width the step samples (one extra emission per step)
    recon_always: bool = False

    def __post_init__(self) -> None:
        if self.kd_source not in KD_SOURCES:
            raise ValueError(
                f"task.loss.kd_source={self.kd_source!r}; choose one of {list(KD_SOURCES)}"
            )


@dataclass
class ScheduleConfig:
    """Block-wise incremental training (Sommariva et al.): blocks of ``order`` become
    metamorphic one at a time, every ``epochs_per_block`` epochs. ``init=copy`` starts a new
    block's heads as copies of the previous block's trained heads (``random``: fresh heads);
    ``freeze_earlier`` stops training the heads of blocks added before the newest."""

    enabled: bool = False
    order: list[str] = field(default_factory=list)  # [] = the scope's block order
    epochs_per_block: int = 1
    init: str = "copy"
    freeze_earlier: bool = False


@dataclass
class MetamorphConfig:
    """Everything the metamorphic module needs, stored with its checkpoints as plain data."""

    spec: MetaSpec = field(default_factory=MetaSpec)
    inr: INRConfig = field(default_factory=INRConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-2)
    )
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(name="cosine"))
    coord_noise: float = 1.0
    noise_quirk: bool = False  # the official code's layer-id / fan-in noise behaviour
    ema_decay: float = 0.995
    # the EMA also averages the trained shared tensors (anchors, BN affine, classifier), and
    # evaluation uses those averages; off: they are evaluated live (as before this option)
    ema_shared: bool = False
    eval_k: int = 1
    shared: list[str] = field(default_factory=list)  # base tensors trained jointly (e.g. fc.weight)
    shared_lr_factor: float = 1.0  # learning rate of the shared tensors, x the INR's
    # the shared tensors' own optimizer (e.g. the slimmable baseline's SGD); None: the INR's
    # optimizer at shared_lr_factor x its learning rate
    shared_optim: OptimConfig | None = None
    # which shared tensors take ``shared_optim`` (fnmatch patterns over dotted names such as
    # "layer1.0.bn1.weight"); the others stay with the INR's optimizer at shared_lr_factor
    shared_optim_params: list[str] = field(default_factory=lambda: ["*"])
    recon_warmup_steps: int = 0  # pure reconstruction steps before the first CE step
    # After the warm-up the gradients grow by orders of magnitude while Adam's second-moment
    # estimate still holds the tiny reconstruction gradients, so the first classifier steps are
    # far larger than lr and undo the warm-up. Options: clear the optimizer state when the
    # classifier loss starts, and ramp the learning rate linearly from 0 over ``lr_ramp_steps``.
    reset_optimizer_after_warmup: bool = False
    lr_ramp_steps: int = 0
    # Multiplier of the scheduled lr once the classifier loss is on. Adam's sign-like first
    # steps at lr 1e-3 move every INR parameter at once and kill the emitted block's ReLUs
    # (measured: accuracy collapses to the same ~70% at every width); ~1e-4 does not.
    post_warmup_lr_factor: float = 1.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # compute the frozen blocks before the first metamorphic one once per batch and share the
    # activation between the sampled shapes and the teacher (same numbers, less compute)
    share_prefix: bool = True
    # coordinate noise per query (NeuMeta) or per row / column (``hypernet.inr.NOISE_MODES``:
    # the input layer keeps its outer-sum form, fewer FLOPs per step; different draws)
    coord_noise_mode: str = "query"
    # the per-step training metrics (losses, gamma) are logged every this many steps: each
    # logged tensor is read back to the host, a GPU sync (1: every step, as before)
    log_every_n_steps: int = 1
    compile: CompileConfig = field(default_factory=CompileConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.coord_noise_mode not in NOISE_MODES:
            raise ValueError(
                f"task.coord_noise_mode={self.coord_noise_mode!r}; choose one of {list(NOISE_MODES)}"
            )
        if int(self.log_every_n_steps) < 1:
            raise ValueError(f"task.log_every_n_steps={self.log_every_n_steps}; it must be >= 1")


RECON_TYPES = ("weighted", "mse", "relative")


def recon_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "relative":
        return F.mse_loss(pred, target) / target.pow(2).mean().clamp_min(1e-12)
    if kind == "weighted":
        w = target.abs()
        w = w / w.max().clamp_min(1e-12)
        return (w * (pred - target) ** 2).mean()
    raise ValueError(f"unknown recon_type {kind!r}; choose one of {', '.join(RECON_TYPES)}")


class EMA(nn.Module):
    """Exponential moving average of a module's parameters (a shadow copy, saved with it), and
    optionally of a second parameter dict (``shared``: the tensors trained beside the INR)."""

    def __init__(self, module: nn.Module, decay: float, shared: nn.ParameterDict | None = None):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(module).requires_grad_(False)
        self.shared_shadow = (
            copy.deepcopy(shared).requires_grad_(False) if shared is not None else None
        )

    @torch.no_grad()
    def sync_structure(self, module: nn.Module) -> None:
        """Adopt heads added to ``module`` since the copy was made (new heads start equal)."""
        mine = dict(self.shadow.named_parameters())
        if set(mine) == {n for n, _ in module.named_parameters()}:
            return
        new = copy.deepcopy(module).requires_grad_(False)
        for n, p in new.named_parameters():
            if n in mine:
                p.copy_(mine[n])
        self.shadow = new

    @torch.no_grad()
    def update(self, module: nn.Module, shared: nn.ParameterDict | None = None) -> None:
        # one fused multi-tensor lerp (the same per-element formula as a lerp_ per tensor)
        shadow = list(self.shadow.parameters())
        torch._foreach_lerp_(shadow, [p.detach() for p in module.parameters()], 1 - self.decay)
        if self.shared_shadow is not None and shared is not None:
            for key, p in shared.items():
                self.shared_shadow[key].lerp_(p.detach(), 1 - self.decay)

    @staticmethod
    @contextlib.contextmanager
    def _swap(params: list[torch.Tensor], values: list[torch.Tensor]):
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module, shared: nn.ParameterDict | None = None):
        """Temporarily load the EMA weights into ``module`` (and into ``shared``, when this EMA
        averages the shared tensors too)."""
        params, values = list(module.parameters()), list(self.shadow.parameters())
        if self.shared_shadow is not None and shared is not None:
            keys = list(shared.keys())
            params += [shared[k] for k in keys]
            values += [self.shared_shadow[k] for k in keys]
        with self._swap(params, values):
            yield module


def build_metanet(
    base_arch: dict, cfg: MetamorphConfig, base_state: dict | None = None
) -> MetaResNet:
    base = CifarResNet(ResNetArch.from_dict(dict(base_arch)))
    if base_state is not None:
        base.load_state_dict(base_state)
    return MetaResNet(base, cfg.spec, cfg.inr, shared=cfg.shared)


class MetamorphModule(L.LightningModule):
    """Trains only the INR (and the configured shared tensors) of a :class:`MetaResNet`."""

    def __init__(
        self,
        net: MetaResNet,
        cfg: MetamorphConfig,
        teacher: nn.Module | None = None,
        hparams: dict | None = None,
    ) -> None:
        super().__init__()
        if cfg.loss.recon_type not in RECON_TYPES:
            raise ValueError(
                f"task.loss.recon_type={cfg.loss.recon_type!r}; choose one of {', '.join(RECON_TYPES)}"
            )
        self.net = net
        self.cfg = cfg
        self.sampler = ShapeSampler(net, cfg.sampling, seed=cfg.seed)
        if cfg.ema_shared and cfg.ema_decay <= 0:
            raise ValueError(
                "task.ema_shared=true averages the shared tensors with the EMA, but "
                f"task.ema_decay={cfg.ema_decay} turns the EMA off; set ema_decay > 0 (e.g. 0.995)"
            )
        self.ema = (
            EMA(net.inr, cfg.ema_decay, shared=net.shared if cfg.ema_shared else None)
            if cfg.ema_decay > 0
            else None
        )
        self.teacher = teacher.requires_grad_(False).eval() if teacher is not None else None
        self._teacher_prefix_ok: dict[int, bool] = {}
        self.save_hyperparameters(
            {
                "config": hparams or {},
                "metamorph": _plain(asdict(cfg)),
                "base_arch": net.base_arch.to_dict(),
            },
            logger=True,
        )
        if cfg.schedule.enabled:
            order = self.schedule_order()
            if cfg.schedule.init not in ("copy", "random"):
                raise ValueError(f"schedule.init={cfg.schedule.init!r}; choose copy or random")
            for b in order[1:]:
                net.set_active(b, False)
        n = net.base_arch.num_classes
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(n, average="micro")

    # ------------------------------------------------------------------ block schedule
    def schedule_order(self) -> list[str]:
        order = list(self.cfg.schedule.order) or list(self.net.head_blocks)
        unknown = [b for b in order if b not in self.net.head_blocks]
        if unknown:
            raise ValueError(f"schedule.order names blocks outside the scope: {unknown}")
        return order

    def apply_schedule(self, epoch: int) -> list[str]:
        """Activate the blocks due at ``epoch`` (idempotent, so resuming is safe)."""
        sc = self.cfg.schedule
        order = self.schedule_order()
        k = min(len(order), 1 + epoch // max(1, sc.epochs_per_block))
        for j in range(k):
            name = order[j]
            if name in self.net.meta_blocks:
                continue
            if sc.init == "copy" and j > 0:
                self.net.copy_block_heads(order[j - 1], name)
                if self.ema is not None:
                    for t in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"):
                        self.ema.shadow.copy_head(f"{order[j - 1]}.{t}", f"{name}.{t}")
            self.net.set_active(name, True)
        if sc.freeze_earlier:
            for j, name in enumerate(order[:k]):
                for t in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"):
                    self.net.inr.head(f"{name}.{t}").requires_grad_(j == k - 1)
        return order[:k]

    def on_train_epoch_start(self) -> None:
        if self.cfg.schedule.enabled:
            active = self.apply_schedule(self.current_epoch)
            self.log("train/metamorphic_blocks", float(len(active)), on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ evaluation weights
    @contextlib.contextmanager
    def eval_weights(self):
        """EMA weights if enabled (NeuMeta evaluates the EMA INR; with ``ema_shared`` the shared
        tensors' averages too)."""
        if self.ema is None:
            yield
        else:
            with self.ema.swapped_into(self.net.inr, self.net.shared):
                yield

    @torch.no_grad()
    def subnet_family(self, k: int | None = None, seed: int = 0, data=None):
        """This checkpoint as a sub-network family whose members carry the evaluation emission
        (:meth:`emit_eval`, K samples, seed): what sweeps and searches evaluate."""
        from metamorph.hypernet.evaluate import EmittedFamily

        return EmittedFamily(self.net, lambda hidden: self.emit_eval(hidden, k=k, seed=seed))

    def emit_eval(
        self, hidden: Shape, k: int | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Emission used for evaluation: EMA weights, K-sample averaged (first sample noise-free,
        so K = 1 is the noise-free emission, as in NeuMeta's ``sample_merge_model``); with kept
        BatchNorm, the shape's BN statistics are added (:meth:`MetaResNet.bn_statistics`)."""
        k = self.cfg.eval_k if k is None else k
        g = torch.Generator().manual_seed(seed)
        noise = self.cfg.coord_noise if k > 1 else 0.0
        with self.eval_weights():
            out = self.net.emit(hidden, noise=noise, generator=g, quirk=self.cfg.noise_quirk, k=k)
            if self.ema is not None and self.ema.shared_shadow is not None:
                # the averaged shared tensors travel with the emission (params_for takes emitted
                # tensors first), since the live ones are back in place once this block exits
                out.update(self.net.shared_tensors(hidden))
            stats = self.net.bn_statistics(hidden, out)
        return {**out, **stats}

    # ------------------------------------------------------------------ training
    def _prefix(self) -> int | None:
        """Blocks whose activation this step shares (None: run every shape from the images)."""
        if not self.cfg.share_prefix:
            return None
        n = self.net.frozen_prefix()
        if n is None or self.teacher is None:
            return n
        ok = self._teacher_prefix_ok.get(n)
        if ok is None:  # the teacher must compute the same prefix (it is the prepared network)
            t_state = self.teacher.state_dict()
            names = [k for k in self.net.base_keys if k.startswith(("conv1.", "bn1."))]
            for b in self.net._all_blocks[:n]:
                names += [k for k in self.net.base_keys if k.startswith(b + ".")]
            ok = isinstance(self.teacher, CifarResNet) and all(
                k in t_state and torch.equal(t_state[k], self.net.base_tensor(k)) for k in names
            )
            self._teacher_prefix_ok[n] = ok
        return n if ok else None

    def micro_batch(self, batch_idx: int) -> int:
        """Index of this micro-batch in the whole run: the optimizer step with gradient
        accumulation off; with ``trainer.accumulate_grad_batches=a``, ``step * a + position in
        the group``, so each micro-batch draws its own shape and ``full_width_every=a`` forces
        the first micro-batch of every group to full width (the seed paper's scheme)."""
        trainer = self._trainer
        accum = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer else 1
        return self.global_step * accum + (batch_idx % accum if accum > 1 else 0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        step = self.global_step
        micro = self.micro_batch(batch_idx)
        cfg = self.cfg
        warm = step < cfg.recon_warmup_steps
        # the warm-up only fits the full-width emission: no sampled shape to emit
        shapes = [self.net.full_shape] if warm else self.sampler.sample_step(micro)
        g = self.sampler.generator(micro + 7919)
        full_shape = self.net.full_shape
        recon_extra = cfg.loss.recon > 0 and cfg.loss.recon_always and full_shape not in shapes
        # one INR pass for every emission of the step: the sampled shapes, then the full width
        # of the reconstruction loss (the order in which their noise was always drawn)
        emitted = self.net.emit_many(
            shapes + ([full_shape] if recon_extra else []),
            noise=cfg.coord_noise,
            generator=g,
            quirk=cfg.noise_quirk,
            noise_mode=cfg.coord_noise_mode,
        )
        emissions = emitted[: len(shapes)]
        full_emitted = next(
            (e for h, e in zip(shapes, emissions) if h == self.net.full_shape), None
        )
        n = len(shapes)
        losses = {}
        if not warm and cfg.loss.ce > 0:
            start = self._prefix()
            inp = x if start is None else self.net.prefix_features(x, start)
            full = self.net.full_shape
            in_place = cfg.loss.kd > 0 and cfg.loss.kd_source == "full_width"
            outputs = [self.net(inp, h, e, start=start) for h, e in zip(shapes, emissions)]
            t_teacher = t_full = None
            with torch.no_grad():
                if cfg.loss.kd > 0 and self.teacher is not None:
                    if not in_place or full in shapes:
                        t_teacher = (
                            self.teacher(x) if start is None else self.teacher(inp, start=start)
                        )
                if in_place and any(h != full for h in shapes):
                    t_full = (  # the step's own full-width logits, else one extra forward
                        outputs[shapes.index(full)].detach()
                        if full in shapes
                        else self.net(inp, full, self.net.emit(full), start=start)
                    )
            T = cfg.loss.kd_temperature
            ce = kd = 0.0
            used_kd = False
            for hidden, logits in zip(shapes, outputs):
                ce = ce + F.cross_entropy(logits, y)
                # in place: narrower shapes distil from the current full width, which itself
                # distils from the teacher (if any)
                t_logits = t_full if (in_place and hidden != full) else t_teacher
                if t_logits is not None:
                    used_kd = True
                    kd = kd + kl_distillation(logits, t_logits, T)
            losses["ce"] = cfg.loss.ce * ce / n
            if used_kd:
                losses["kd"] = cfg.loss.kd * kd * T * T / n
        if (full_emitted is not None or cfg.loss.recon_always) and cfg.loss.recon > 0:
            if full_emitted is None:
                full_emitted = emitted[-1]
            rec = sum(
                recon_loss(v, self.net.base_tensor(k), cfg.loss.recon_type)
                for k, v in full_emitted.items()
            )
            losses["recon"] = cfg.loss.recon * rec / len(full_emitted)
        if cfg.loss.reg > 0:  # on the sampled shapes' emissions (NeuMeta)
            losses["reg"] = cfg.loss.reg * sum(v.norm() for e in emissions for v in e.values()) / n
        loss = sum(losses.values())
        if step % int(cfg.log_every_n_steps) == 0:  # a logged tensor is a device sync
            for k, v in losses.items():
                self.log(f"train/{k}", v, on_step=True, on_epoch=False)
            self.log("train/loss", loss, prog_bar=True)
            self.log(
                "train/gamma",
                sum(self.net.gamma_of(h) for h in shapes) / n,
                on_step=True,
                on_epoch=False,
            )
        return loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        cfg = self.cfg
        if (
            cfg.reset_optimizer_after_warmup
            and cfg.recon_warmup_steps > 0
            and self.global_step == cfg.recon_warmup_steps
        ):
            for opt in self.trainer.optimizers:
                opt.state.clear()

    def lr_factor(self, step: int) -> float:
        """Multiplier of the scheduled learning rate at ``step`` (the post-warm-up ramp)."""
        n, w = self.cfg.lr_ramp_steps, self.cfg.recon_warmup_steps
        if step < w:
            return 1.0
        f = self.cfg.post_warmup_lr_factor
        return f if n <= 0 else f * min(1.0, (step - w + 1) / n)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        f = self.lr_factor(self.global_step)
        if f == 1.0:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        groups = optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * f
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:  # the scheduler keeps owning the un-ramped value
            for g, lr in zip(groups, saved):
                g["lr"] = lr

    def on_fit_start(self) -> None:
        self.cfg.compile.check_device(self.device)
        self.net.inr.compile_trunk(self.cfg.compile)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.net.inr, self.net.shared)

    # ------------------------------------------------------------------ validation / test
    def on_validation_epoch_start(self) -> None:
        self._val_emitted = self.emit_eval(self.net.full_shape)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x, self.net.full_shape, self._val_emitted)
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self._test_emitted = self.emit_eval(self.net.full_shape)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x, self.net.full_shape, self._test_emitted)
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc, on_epoch=True)

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups() for p in g["params"]]

    def param_groups(self) -> list[dict]:
        """The INR, and the shared tensors: with their own optimizer settings (``shared_optim``)
        or at ``shared_lr_factor`` x the INR's learning rate."""
        inr = [p for p in self.net.inr.parameters() if p.requires_grad]
        own, rest = self.split_shared()
        groups = [{"params": inr}]
        if own:
            groups.append(param_group(own, self.cfg.shared_optim))
        if rest:
            groups.append({"params": rest, "lr": self.cfg.optim.lr * self.cfg.shared_lr_factor})
        return groups

    def split_shared(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The trainable shared tensors that take ``shared_optim`` (those matching
        ``shared_optim_params``) and the rest; every pattern must match a shared tensor."""
        named = [(k.replace("__", "."), p) for k, p in self.net.shared.items() if p.requires_grad]
        patterns = list(self.cfg.shared_optim_params)
        if self.cfg.shared_optim is None:
            if patterns != ["*"]:
                raise ValueError(
                    f"task.shared_optim_params={patterns} selects tensors for task.shared_optim, "
                    "which is null; set task.shared_optim or drop task.shared_optim_params"
                )
            return [], [p for _, p in named]
        unmatched = [pat for pat in patterns if not any(fnmatch(n, pat) for n, _ in named)]
        if unmatched and named:
            raise ValueError(
                f"task.shared_optim_params: {unmatched} match no shared tensor; shared tensors "
                f"are e.g. {', '.join(n for n, _ in named[:6])} (fnmatch patterns, e.g. '*.bn*')"
            )
        own = [p for n, p in named if any(fnmatch(n, pat) for pat in patterns)]
        rest = [p for n, p in named if not any(fnmatch(n, pat) for pat in patterns)]
        return own, rest

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kind"] = "metamorph"  # read by metamorph.runtime.checkpoints.checkpoint_kind

    def configure_optimizers(self):
        return lightning_optimizers(self, self.param_groups(), self.cfg.optim, self.cfg.scheduler)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
