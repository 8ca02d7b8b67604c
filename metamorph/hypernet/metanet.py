"""A metamorphic CIFAR ResNet: frozen prepared weights + an INR that emits the metamorphic ones.

Shapes are ``hidden`` lists like :attr:`ResNetArch.hidden`: ``hidden[s][b]`` is the hidden width
of block b of stage s and ``len(hidden[s])`` the stage's depth (a stage keeps its first blocks).
The target network runs directly on the emitted tensors with ``torch.func.functional_call``, so
cross-entropy gradients reach the INR in the same autograd graph as every other loss.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from metamorph.data.transforms import normalize, random_crop_flip
from metamorph.hypernet.inr import INRConfig, TensorSlot, WeightINR
from metamorph.models.calibrate import BN_STATS, recalibrate_batchnorm
from metamorph.models.folding import fold_batchnorm
from metamorph.models.resnet_cifar import CifarResNet, cifar_resnet_arch
from metamorph.models.segments import block_names
from metamorph.models.subnet import ResNetWidths, as_lists, register_subnet_family

Shape = list[list[int]]
BLOCK_TENSORS = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")
KEPT_BN_PARAMS = ("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias")
VARIANT_SCALARS = {"skipinit": "alpha", "learnable_shortcut": "shortcut_scale"}


@dataclass
class MetaSpec:
    """What is metamorphic and over which range.

    ``blocks``: names like ``"layer3.2"``; ``"all"`` selects every BasicBlock.
    ``min_width_ratio`` / ``max_width_ratio``: trained hidden-width range as a fraction of each
    block's pretrained width (NeuMeta: [0.5, 1.0]). ``max_width_factor``: the largest width that
    may be emitted, as a multiple of the pretrained width. ``min_depth``: fewest blocks a stage
    may keep when depth varies (``depth_choices`` lists the depths sampled in training).
    """

    blocks: list[str] = field(default_factory=lambda: ["layer3.2"])
    min_width_ratio: float = 0.5
    max_width_ratio: float = 1.0
    max_width_factor: float = 2.0
    depth_choices: list[int] = field(default_factory=list)  # [] = depth fixed
    norm: float | None = None  # N of the coordinates; default: widest stage width
    # metamorph extension (not in NeuMeta): emitted = first-d-channel slice of the prepared
    # weights (zero-padded above full width) + the INR's output, whose last layer starts at 0
    anchor: bool = False
    # metamorph extension: the anchor itself is trained (shared by every shape, as the weights of
    # a slimmable network are), so a shape's weights are a slice of trained shared weights plus
    # the INR's shape-dependent correction; needs ``anchor``
    anchor_trainable: bool = False
    # metamorph extension for kept BatchNorm: a BN right after a conv cancels that conv's bias, so
    # the INR's bias output (its change from the anchor / prepared bias) shifts the BN's output
    # instead -- a per-shape BN beta; off, the bias heads are dead weight under keep BN
    bias_after_bn: bool = False

    def __post_init__(self) -> None:
        if self.anchor_trainable and not self.anchor:
            raise ValueError("task.scope.anchor_trainable=true needs task.scope.anchor=true")


@register_subnet_family
class MetaResNet(ResNetWidths, nn.Module):
    """Frozen base network (folded, permuted) whose chosen blocks come from a :class:`WeightINR`.

    A sub-network family over ``hidden`` shapes (:class:`~metamorph.models.subnet.ResNetWidths`):
    each metamorphic block 1..``max_width``, each stage 1..its depth; :meth:`sample` draws
    inside the trained width range and depths."""

    family_name = "metamorphic"
    shape_kind = "metamorphic"

    def __init__(
        self, base: CifarResNet, spec: MetaSpec, inr_cfg: INRConfig, shared: list[str] | None = None
    ) -> None:
        super().__init__()
        if base.arch.bn:
            raise ValueError(
                "the base network must have its BatchNorm folded (fold_batchnorm) first"
            )
        self.base_arch = copy.deepcopy(base.arch)
        self.spec = spec
        all_blocks = block_names(self.base_arch)
        blocks = all_blocks if spec.blocks in (["all"], "all") else list(spec.blocks)
        unknown = [b for b in blocks if b not in all_blocks]
        if unknown:
            raise ValueError(f"unknown metamorphic blocks {unknown}; this network has {all_blocks}")
        self.head_blocks: list[str] = []  # blocks with INR heads, in the order they were added
        # Which blocks currently take their weights from the INR (block-incremental training
        # activates them one at a time); a buffer, so checkpoints restore it.
        self.register_buffer("block_active", torch.zeros(len(all_blocks), dtype=torch.bool))
        self._all_blocks = all_blocks
        # Global slot index: position of a tensor in the full network, independent of scope and depth.
        self.slot_of: dict[str, TensorSlot] = {}
        state = base.state_dict()
        for bi, bname in enumerate(all_blocks):
            for k, t in enumerate(BLOCK_TENSORS):
                kind = t.split(".")[1]
                shape = state[f"{bname}.{t}"].shape
                full = (shape[0], shape[1] if kind == "weight" else 1)
                self.slot_of[f"{bname}.{t}"] = TensorSlot(
                    f"{bname}.{t}", 4 * bi + k, kind, (3, 3), full
                )
        norm = spec.norm or float(max(self.base_arch.stage_widths))
        self.inr = WeightINR(inr_cfg, num_slots=4 * len(all_blocks), norm=norm)
        # Frozen prepared weights (buffers: saved in checkpoints, never trained).
        self.base_keys = list(state)
        for k, v in state.items():
            self.register_buffer("base__" + k.replace(".", "__"), v.detach().clone())
        # Shared trainable parameters (e.g. the classifier or SkipInit alphas), one copy for all shapes.
        # The scalars of a BN-replacement block variant (SkipInit alpha, learnable shortcut scale)
        # in metamorphic blocks are shared across shapes and trained with the INR.
        shared = list(shared or [])
        if spec.anchor_trainable:
            shared += [
                f"{b}.{t}" for b in blocks for t in BLOCK_TENSORS if f"{b}.{t}" not in shared
            ]
        for b in blocks:
            scalar = VARIANT_SCALARS.get(self.base_arch.variant_of(b))
            if scalar and f"{b}.{scalar}" not in shared:
                shared.append(f"{b}.{scalar}")
        # "Keep BN" blocks: the BN affine parameters are shared by every shape (cut to the block's
        # width, as a slimmable network's are); the statistics are batch statistics in training
        # and are computed per shape for evaluation (:meth:`bn_statistics`) on calibration images
        # stored with the network (:meth:`set_bn_calibration`).
        outside = [b for b in self.base_arch.bn_blocks if b not in blocks]
        if outside:
            raise ValueError(
                f"blocks {outside} keep BatchNorm but are not metamorphic; keep BN only in the "
                "metamorphic blocks (prepare.bn_strategy=keep does) or fold it"
            )
        for b in self.base_arch.bn_blocks:
            shared += [f"{b}.{t}" for t in KEPT_BN_PARAMS if f"{b}.{t}" not in shared]
        if spec.bias_after_bn and not self.base_arch.bn_blocks:
            raise ValueError(
                "task.scope.bias_after_bn=true needs BatchNorm kept in the metamorphic blocks "
                "(task.prepare.bn_strategy=keep); with folded BN the conv bias already acts"
            )
        self.register_buffer("bn_calib", torch.zeros(0, dtype=torch.uint8))
        # kept-BN statistics on the calibration images crop+flip augmented as in training
        # (zero padding ``bn_augment_padding``, a fixed seed): the statistics the trained
        # weights saw as batch statistics. Non-augmented images shift them (ResNet-20, keep BN:
        # -2 to -5 points of test accuracy); False reproduces the earlier evaluation.
        self.bn_augment = True
        self.bn_augment_padding = 4
        self.bn_augment_seed = 0
        self.shared = nn.ParameterDict()
        for name in shared:
            self.shared[name.replace(".", "__")] = nn.Parameter(state[name].detach().clone())
        self._templates: OrderedDict[str, nn.Module] = OrderedDict()
        for b in blocks:
            self.add_block(b)

    # ------------------------------------------------------------------ scope
    @property
    def meta_blocks(self) -> list[str]:
        """The blocks whose weights currently come from the INR."""
        return [b for b in self.head_blocks if bool(self.block_active[self._all_blocks.index(b)])]

    def add_block(self, name: str, init_from: str | None = None, active: bool = True) -> None:
        """Give block ``name`` INR heads (copies of ``init_from``'s heads if given)."""
        if name not in self.head_blocks:
            for t in BLOCK_TENSORS:
                src = f"{init_from}.{t}" if init_from else None
                self.inr.add_slot(self.slot_of[f"{name}.{t}"], init_from=src)
                if self.spec.anchor and src is None:
                    out = self.inr.head(f"{name}.{t}").out
                    nn.init.zeros_(out.weight)
                    nn.init.zeros_(out.bias)
            self.head_blocks.append(name)
        self.set_active(name, active)

    def set_active(self, name: str, active: bool = True) -> None:
        if name not in self.head_blocks:
            raise ValueError(f"{name} has no INR heads; metamorphic blocks: {self.head_blocks}")
        self.block_active[self._all_blocks.index(name)] = active

    def copy_block_heads(self, src: str, dst: str) -> None:
        """INR initialisation: ``dst``'s heads start as copies of ``src``'s trained heads."""
        for t in BLOCK_TENSORS:
            self.inr.copy_head(f"{src}.{t}", f"{dst}.{t}")

    def base_tensor(self, name: str) -> torch.Tensor:
        return getattr(self, "base__" + name.replace(".", "__"))

    @torch.no_grad()
    def prepared_network(self) -> CifarResNet:
        """The frozen prepared (folded, permuted) pretrained network as a standalone module: the
        reference of statistics calibration (:mod:`metamorph.models.calibrate`)."""
        net = CifarResNet(copy.deepcopy(self.base_arch))
        net.load_state_dict({k: self.base_tensor(k).detach().cpu().clone() for k in self.base_keys})
        return net.eval()

    @property
    def full_shape(self) -> Shape:
        return [list(s) for s in self.base_arch.hidden]

    # ------------------------------------------------------------------ shapes
    def max_width(self, block: str) -> int:
        return max(1, int(self.full_width(block) * self.spec.max_width_factor))

    def width_ranges(self) -> dict[str, tuple[int, int]]:
        return {b: (1, self.max_width(b)) for b in self.meta_blocks}

    def depth_floor(self) -> int:
        return 1

    def trained_width_range(self, block: str) -> tuple[int, int]:
        """The hidden widths of ``block`` seen in training (``min/max_width_ratio``)."""
        full = self.full_width(block)
        lo = max(1, math.ceil(self.spec.min_width_ratio * full - 1e-9))
        hi = max(lo, math.floor(self.spec.max_width_ratio * full + 1e-9))
        return lo, hi

    def sample_ranges(self) -> dict[str, tuple[int, int]]:
        return {b: self.trained_width_range(b) for b in self.meta_blocks}

    def sample_depths(self) -> list[list[int]]:
        choices = [int(c) for c in self.spec.depth_choices if int(c) >= 1]
        return [
            sorted({min(c, len(stage)) for c in choices} | {len(stage)})
            for stage in self.base_arch.hidden
        ]

    def is_seen(self, hidden: Shape) -> bool:
        """Inside the trained width range for every metamorphic block, and a trained depth."""
        spec = self.spec
        for s, stage in enumerate(hidden):
            base = self.base_arch.hidden[s]
            if len(stage) != len(base) and not (
                spec.depth_choices and min(len(base), *spec.depth_choices) <= len(stage)
            ):
                return False
            for b, w in enumerate(stage):
                name = f"layer{s + 1}.{b}"
                if name in self.meta_blocks:
                    full = self.full_width(name)
                    lo = math.ceil(spec.min_width_ratio * full - 1e-9)
                    hi = math.floor(spec.max_width_ratio * full + 1e-9)
                    if not lo <= w <= hi:
                        return False
        return True

    def trained_gamma_range(self) -> tuple[float, float]:
        s = self.spec
        return (max(0.0, 1 - s.max_width_ratio), min(1.0, 1 - s.min_width_ratio))

    def check_shape(self, hidden: Shape) -> None:
        self.validate(hidden)

    def forward_at(self, x: torch.Tensor, hidden) -> torch.Tensor:
        """Logits at ``hidden`` from a fresh noise-free emission with this shape's kept-BN
        statistics: what :meth:`materialize` ``(hidden)`` computes."""
        hidden = as_lists(self.validate(hidden))
        with torch.no_grad():
            emitted = self.emit(hidden)
            emitted.update(self.bn_statistics(hidden, emitted))
            return self(x, hidden, emitted)

    @classmethod
    def example(cls) -> MetaResNet:
        torch.manual_seed(0)
        base = CifarResNet(cifar_resnet_arch(depth=8, stage_widths=[4, 8, 8]))
        fold_batchnorm(base.eval())
        spec = MetaSpec(blocks=["all"], depth_choices=[1])
        return cls(base, spec, INRConfig(hidden=8, layers=1, freqs=2)).eval()

    # ------------------------------------------------------------------ emission
    def tensor_shape(self, name: str, hidden: Shape) -> tuple[int, ...]:
        block, t = name.rsplit(".", 2)[0], ".".join(name.rsplit(".", 2)[1:])
        s, b = (int(x) for x in block.removeprefix("layer").split("."))
        w = hidden[s - 1][b]
        base = self.base_tensor(name).shape
        if t == "conv1.weight":
            return (w, base[1], *base[2:])
        if t == "conv1.bias":
            return (w,)
        if t == "conv2.weight":
            return (base[0], w, *base[2:])
        return tuple(base)

    def anchor_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The anchor cut (or zero-padded) to ``shape``: the prepared weights, or their trained
        shared copy with ``anchor_trainable`` (differentiable either way)."""
        key = name.replace(".", "__")
        base = self.shared[key] if key in self.shared else self.base_tensor(name)
        if tuple(base.shape) == tuple(shape):
            return base
        idx = tuple(slice(0, min(a, b)) for a, b in zip(base.shape, shape))
        cut = base[idx]
        pad = [p for a, b in zip(reversed(base.shape), reversed(shape)) for p in (0, max(0, b - a))]
        return torch.nn.functional.pad(cut, pad) if any(pad) else cut

    def shared_tensors(self, hidden: Shape) -> dict[str, torch.Tensor]:
        """Copies of the shared tensors that the network at ``hidden`` reads directly (cut to
        the shape), not those that only anchor an emitted tensor: a snapshot that keeps the
        current values when the shared parameters change later (the EMA swap)."""
        emitted = set(self.present_meta_tensors(hidden))
        out = {}
        for name, ref in self.template(hidden).state_dict(keep_vars=True).items():
            if name not in emitted and name.replace(".", "__") in self.shared:
                out[name] = self.anchor_tensor(name, tuple(ref.shape)).detach().clone()
        return out

    def present_meta_tensors(self, hidden: Shape) -> list[str]:
        names = []
        for blk in self.meta_blocks:
            s, b = (int(x) for x in blk.removeprefix("layer").split("."))
            if b < len(hidden[s - 1]):
                names += [f"{blk}.{t}" for t in BLOCK_TENSORS]
        return names

    def emit(
        self,
        hidden: Shape,
        noise: float = 0.0,
        generator: torch.Generator | None = None,
        quirk: bool = False,
        k: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Metamorphic tensors at shape ``hidden``; ``k > 1`` averages k emissions (the first
        noise-free, the others with coordinate noise ``noise``) -- NeuMeta's manifold sampling."""
        return self.emit_many([hidden], noise, generator, quirk, k)[0]

    def emit_many(
        self,
        shapes: list[Shape],
        noise: float = 0.0,
        generator: torch.Generator | None = None,
        quirk: bool = False,
        k: int = 1,
        noise_mode: str = "query",
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`emit` for several shapes in one batched INR pass (``WeightINR.emit_tensors``:
        the heads of equally sized tensors run as batched matmuls, one autograd graph), with
        the noise drawn in the order the per-shape calls draw it. ``noise_mode="axis"``: per-row
        / per-column coordinate noise (``hypernet.inr.NOISE_MODES``)."""
        if quirk and noise > 0 and noise_mode != "query":
            raise ValueError(
                "task.noise_quirk=true reproduces the official per-query noise; it cannot "
                f"combine with task.coord_noise_mode={noise_mode!r} (use query)"
            )
        if (quirk and noise > 0) or self.inr.batched is False:
            # the official code's head routing, and the reference path: one head at a time
            return [self._emit_per_tensor(h, noise, generator, quirk, k) for h in shapes]
        requests, index = [], []
        for hidden in shapes:
            self.check_shape(hidden)
            names = self.present_meta_tensors(hidden)
            index.append([])
            for name in names:
                slot, shape = self.slot_of[name], self.tensor_shape(name, hidden)
                first = len(requests)
                requests.append((slot, shape, noise if k <= 1 else 0.0))
                requests += [(slot, shape, noise)] * max(0, k - 1)
                index[-1].append((name, shape, first))
        ws = self.inr.emit_tensors(requests, generator, noise_mode)
        out = []
        for entries in index:
            emitted = {}
            for name, shape, first in entries:
                w = ws[first]
                if k > 1:
                    for j in range(1, k):
                        w = w + ws[first + j]
                    w = w / k
                emitted[name] = w + self.anchor_tensor(name, shape) if self.spec.anchor else w
            out.append(emitted)
        return out

    def _emit_per_tensor(
        self,
        hidden: Shape,
        noise: float,
        generator: torch.Generator | None,
        quirk: bool,
        k: int,
    ) -> dict[str, torch.Tensor]:
        """The reference emission: one INR head after the other (and the noise quirk's path)."""
        self.check_shape(hidden)
        names = self.present_meta_tensors(hidden)
        out = {}
        for name in names:
            slot = self.slot_of[name]
            shape = self.tensor_shape(name, hidden)
            if k <= 1:
                w = self.inr.emit_tensor(slot, shape, noise, generator, quirk)
            else:
                acc = self.inr.emit_tensor(slot, shape, 0.0)
                for _ in range(k - 1):
                    acc = acc + self.inr.emit_tensor(slot, shape, noise, generator, quirk)
                w = acc / k
            out[name] = w + self.anchor_tensor(name, shape) if self.spec.anchor else w
        return out

    def params_for(
        self, hidden: Shape, emitted: dict[str, torch.Tensor], fresh_bn_stats: bool = False
    ) -> dict[str, torch.Tensor]:
        """Every tensor of the network at ``hidden``: emitted, shared (cut to the shape), or
        frozen base. Kept BatchNorm statistics come from ``emitted`` (:meth:`bn_statistics`),
        or are throw-away tensors with ``fresh_bn_stats`` (training: batch statistics)."""
        template = self.template(hidden)
        params = {}
        for name, ref in template.state_dict(keep_vars=True).items():
            if name in emitted:
                params[name] = emitted[name]
            elif name.replace(".", "__") in self.shared:
                params[name] = self.anchor_tensor(name, tuple(ref.shape))
            elif self._kept_bn_block(name) and (
                fresh_bn_stats or self._kept_bn_block(name) in self.meta_blocks
            ):
                if not fresh_bn_stats:
                    raise ValueError(
                        f"{name}: no BatchNorm statistics for this shape; evaluate with "
                        "MetamorphModule.emit_eval or add MetaResNet.bn_statistics(...) to the "
                        "emitted tensors"
                    )
                params[name] = self._fresh_stat(name, ref.shape)
            else:
                params[name] = self.base_tensor(name)
        if self.spec.bias_after_bn:
            self._shift_kept_bn(params, emitted)
        return params

    def _shift_kept_bn(self, params: dict[str, torch.Tensor], emitted: dict[str, torch.Tensor]):
        """``bias_after_bn``: add each emitted conv bias's change from its anchor to the beta of
        the kept BatchNorm that follows the conv (which would cancel the bias itself)."""
        for blk in self.base_arch.bn_blocks:
            for i in (1, 2):
                conv_b, bn_b = f"{blk}.conv{i}.bias", f"{blk}.bn{i}.bias"
                if conv_b in emitted and bn_b in params:
                    b = emitted[conv_b]
                    params[bn_b] = params[bn_b] + (b - self.anchor_tensor(conv_b, tuple(b.shape)))

    def template(self, hidden: Shape) -> nn.Module:
        """A parameter-less (meta-device) module of the right structure, cached per shape."""
        key = repr(hidden)
        mod = self._templates.get(key)
        if mod is None:
            with torch.device("meta"):
                mod = CifarResNet(self.arch_for(hidden))
            self._templates[key] = mod
            if len(self._templates) > 64:
                self._templates.popitem(last=False)
        return mod

    def forward(
        self,
        x: torch.Tensor,
        hidden: Shape,
        emitted: dict[str, torch.Tensor] | None = None,
        start: int | None = None,
    ) -> torch.Tensor:
        """Logits at shape ``hidden``; with ``start=k``, ``x`` is :meth:`prefix_features` ``(.., k)``.

        Kept BatchNorm layers use batch statistics in training mode, and in evaluation mode the
        per-shape statistics that ``emitted`` must then carry (:meth:`bn_statistics`)."""
        if emitted is None:
            emitted = self.emit(hidden)
        template = self.template(hidden)
        batch_stats = False
        if self.base_arch.bn_blocks:
            batch_stats = self.training and not any(k.endswith(".running_mean") for k in emitted)
            template.train(batch_stats)
        kwargs = {} if start is None else {"start": start}
        params = self.params_for(hidden, emitted, fresh_bn_stats=batch_stats)
        return functional_call(template, params, (x,), kwargs)

    # ------------------------------------------------------------------ kept BatchNorm
    def _kept_bn_block(self, name: str) -> str | None:
        """The block of a kept BatchNorm statistic ``name`` (``layer3.2.bn1.running_mean``)."""
        block = name.rsplit(".", 2)[0] if name.count(".") == 3 else ""
        ok = block in self.base_arch.bn_blocks and name.endswith(BN_STATS)
        return block if ok else None

    def set_bn_calibration(self, images: torch.Tensor) -> None:
        """Store the images (uint8 NCHW, or already normalized float) on which :meth:`bn_statistics`
        computes each shape's BatchNorm statistics; saved with the network. Float images are
        used as they are (not augmented: zero padding needs the raw pixels)."""
        if images.dim() != 4:
            raise ValueError(f"BN calibration images must be NCHW, got shape {tuple(images.shape)}")
        self.bn_calib = images.detach().to(self.bn_calib.device).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "bn_calib"
        if key in state_dict:  # its size is the stored images', not the empty default's
            self.bn_calib = torch.empty_like(state_dict[key], device=self.bn_calib.device)
        else:  # checkpoints written before kept BatchNorm existed have none (and need none)
            state_dict[key] = torch.zeros(0, dtype=torch.uint8)
            self.bn_calib = torch.zeros(0, dtype=torch.uint8, device=self.bn_calib.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def bn_statistics(
        self,
        hidden: Shape,
        emitted: dict[str, torch.Tensor],
        images: torch.Tensor | None = None,
        batch_size: int = 256,
    ) -> dict[str, torch.Tensor]:
        """Statistics of every kept BatchNorm layer of the network at ``hidden`` (running mean,
        variance, count), by BN recalibration of the shape's plain network over ``images``
        (default: the stored calibration images; uint8 images are crop+flip augmented first
        when :attr:`bn_augment`, as the training batches were). ``{}`` when no BatchNorm is kept."""
        names = [
            n for n in self.template(hidden).state_dict(keep_vars=True) if self._kept_bn_block(n)
        ]
        if not names:
            return {}
        x_all = self.bn_calib if images is None else images
        if len(x_all) == 0:
            raise ValueError(
                "this network keeps BatchNorm but has no calibration images for its statistics: "
                "call set_bn_calibration(train_images) (metamorph-train stores them)"
            )
        net = CifarResNet(self.arch_for(hidden)).to(self.bn_calib.device)
        net.load_state_dict(self.params_for(hidden, emitted, fresh_bn_stats=True))
        if x_all.dtype == torch.uint8:
            if self.bn_augment:
                g = torch.Generator(device=x_all.device).manual_seed(self.bn_augment_seed)
                x_all = random_crop_flip(x_all, padding=self.bn_augment_padding, generator=g)
            x_all = normalize(x_all, self.base_arch.mean, self.base_arch.std)
        batches = (x_all[i : i + batch_size] for i in range(0, len(x_all), batch_size))
        stats = recalibrate_batchnorm(net, batches)
        return {n: stats[n] for n in names}

    def _fresh_stat(self, name: str, shape) -> torch.Tensor:
        dev = self.bn_calib.device
        if name.endswith("num_batches_tracked"):
            return torch.zeros((), dtype=torch.long, device=dev)
        fill = 1.0 if name.endswith("running_var") else 0.0
        return torch.full(tuple(shape), fill, device=dev)

    def frozen_prefix(self) -> int | None:
        """How many leading blocks every shape computes from the frozen prepared weights alone
        (after the stem), so their activation can be computed once per batch and shared by
        several shapes and the distillation teacher; ``None`` when the stem itself is trained.
        With depth sampling only the stem is shared (a shallower stage moves block indices)."""
        shared = {n.replace("__", ".") for n in self.shared}
        if any(n.startswith(("conv1.", "bn1.")) for n in shared):
            return None
        if self.spec.depth_choices:
            return 0
        active = set(self.meta_blocks)
        n = 0
        for b in self._all_blocks:
            if (
                b in active
                or b in self.base_arch.bn_blocks
                or any(t.startswith(b + ".") for t in shared)
            ):
                break
            n += 1
        return n

    def prefix_features(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Activation after the stem and the first ``n`` blocks, from the frozen prepared weights
        (no graph: nothing in it is trained; see :meth:`frozen_prefix`)."""
        full = self.full_shape
        params = {k: self.base_tensor(k) for k in self.base_keys}
        with torch.no_grad():
            return functional_call(self.template(full), params, (x,), {"stop": n})

    @torch.no_grad()
    def materialize(
        self,
        hidden: Shape,
        k: int = 1,
        noise: float = 0.0,
        seed: int = 0,
        emitted: dict[str, torch.Tensor] | None = None,
    ) -> CifarResNet:
        """A standalone plain network (no INR) at ``hidden``, on the CPU: from ``emitted`` (with
        any kept-BN statistics), or from a fresh emission with this shape's statistics."""
        hidden = as_lists(self.validate(hidden))
        if emitted is None:
            g = torch.Generator().manual_seed(seed)
            emitted = self.emit(hidden, noise=noise, generator=g, k=k)
            emitted.update(self.bn_statistics(hidden, emitted))
        net = CifarResNet(self.arch_for(hidden))
        net.load_state_dict(
            {k_: v.detach().cpu() for k_, v in self.params_for(hidden, emitted).items()}
        )
        return net.eval()
