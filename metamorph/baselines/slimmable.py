"""A universally slimmable CIFAR ResNet over the metamorphic blocks' hidden width.

The Slimmable baseline of NeuMeta's Table 2 (Yu & Huang, "Universally Slimmable Networks and
Improved Training Techniques", ICCV 2019), restricted, like NeuMeta, to the hidden width of the
metamorphic blocks (``layer3.2`` of ResNet-20 by default; ``"all"`` for every block):

* **weight sharing by slicing**: width ``d`` of a block uses the first ``d`` output channels of
  ``conv1``, the first ``d`` channels of ``bn1`` (affine parameters shared) and the first ``d``
  input channels of ``conv2``; every other tensor is shared as it is;
* **sandwich rule**: each step trains the largest width, the smallest and ``num_random`` others;
* **in-place distillation**: the largest width learns from the labels, the others from its soft
  predictions (detached);
* **BN recalibration**: after training, the BN statistics of each width are re-estimated (reset,
  then ``N`` training batches in train mode without gradients, cumulative average), stored per
  shape and used by :meth:`SlimmableResNet.materialize`, which returns a plain
  :class:`CifarResNet` of that shape.

NeuMeta's setting (official code ``SLIM_FLAGS``): widths ``[0.5, 0.75, 1.0]`` in training, also
``0.25`` at test, i.e. gamma 0 / 0.25 / 0.5 seen and 0.75 unseen.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from metamorph.models.calibrate import recalibrate_batchnorm
from metamorph.models.distill import soft_cross_entropy
from metamorph.models.resnet_cifar import CifarResNet, cifar_resnet_arch
from metamorph.models.segments import Suffix, forward_from, forward_to, resolve_blocks
from metamorph.models.subnet import ResNetWidths, as_lists, register_subnet_family

Shape = list[list[int]]
BNStats = dict[str, torch.Tensor]

__all__ = [
    "SandwichSampler",
    "SlimmableConfig",
    "SlimmableResNet",
    "shape_key",
    "soft_cross_entropy",
    "sort_hidden_channels",
]


@dataclass
class SlimmableConfig:
    """``task=slimmable`` options besides ``name``, ``optim`` and ``scheduler``.

    ``train_widths``: width ratios ``d / d_full`` trained (sandwich: max, min and ``num_random``
    others per step, drawn from the list without its ends (``random_mode: list``) or uniformly
    from the integer widths between them (``uniform``)). ``eval_gammas``: compression ratios
    recalibrated after training and reported. ``calib_batches``: training batches per width for the
    final BN recalibration; ``val_calib_batches``: for the quick one before each validation.
    ``reorder: l1`` first sorts the blocks' hidden channels by decreasing L1 norm of ``conv1``
    (function unchanged), so that the first ``d`` channels of a pretrained network are its
    L1-pruned subnetwork.
    """

    blocks: list[str] = field(default_factory=lambda: ["layer3.2"])
    train_widths: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    num_random: int = 1
    random_mode: str = "list"  # list | uniform
    inplace_distill: bool = True
    kd_temperature: float = 1.0
    label_smoothing: float = 0.0
    reorder: str = "none"  # none | l1
    eval_gammas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    calib_batches: int = 20
    val_calib_batches: int = 4
    calib_batch_size: int | None = None  # default: data.batch_size
    # recalibrate on crop+flip augmented training images, as the training batches were (the
    # statistics the weights were trained with); false: non-augmented (before 2026-11-27)
    calib_augment: bool = True

    def __post_init__(self) -> None:
        if not self.train_widths or not all(0 < r <= 1 for r in self.train_widths):
            raise ValueError(f"train_widths must be ratios in (0, 1], got {self.train_widths}")
        if self.random_mode not in ("list", "uniform"):
            raise ValueError(f"random_mode must be list or uniform, got {self.random_mode!r}")
        if self.reorder not in ("none", "l1"):
            raise ValueError(f"reorder must be none or l1, got {self.reorder!r}")
        if self.num_random < 0 or self.calib_batches < 1 or self.val_calib_batches < 0:
            raise ValueError("num_random >= 0, calib_batches >= 1 and val_calib_batches >= 0")
        if not all(0 <= g < 1 for g in self.eval_gammas):
            raise ValueError(f"eval_gammas must be in [0, 1), got {self.eval_gammas}")


def shape_key(hidden: Shape) -> str:
    """The key of a shape in the per-width BN statistics (``json.dumps(hidden)``)."""
    return json.dumps([[int(w) for w in s] for s in hidden])


@torch.no_grad()
def sort_hidden_channels(net: CifarResNet, blocks: str | Iterable[str]) -> CifarResNet:
    """Permute each chosen block's hidden channels by decreasing ``sum |conv1.weight|`` (in place;
    the function computed is unchanged)."""
    for name in resolve_blocks(net.arch, blocks):
        block = net.get_submodule(name)
        order = torch.argsort(block.conv1.weight.abs().flatten(1).sum(1), descending=True)
        for t in [
            block.conv1.weight,
            block.conv1.bias,
            *block.bn1.parameters(),
            *block.bn1.buffers(),
        ]:
            if t is not None and t.dim() > 0:
                t.copy_(t[order])
        block.conv2.weight.copy_(block.conv2.weight[:, order])
    return net


class SandwichSampler:
    """Width ratios of one training step: ``[max, min, r_1, ..., r_n]``, seeded by the step."""

    def __init__(
        self,
        widths: Iterable[float],
        num_random: int = 1,
        mode: str = "list",
        seed: int = 0,
        full: int | None = None,
    ) -> None:
        self.widths = sorted({float(w) for w in widths})
        self.num_random = int(num_random)
        self.mode = mode
        self.seed = int(seed)
        self.full = full  # full width, for mode="uniform" (integer widths between the ends)

    def __call__(self, step: int) -> list[float]:
        lo, hi = self.widths[0], self.widths[-1]
        out = [hi] if lo == hi else [hi, lo]
        if self.num_random == 0:
            return out
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        if self.mode == "uniform" and self.full:
            a, b = max(1, round(lo * self.full)), round(hi * self.full)
            draws = torch.randint(a, b + 1, (self.num_random,), generator=g)
            return out + [int(d) / self.full for d in draws]
        inner = self.widths[1:-1] or self.widths
        idx = torch.randint(0, len(inner), (self.num_random,), generator=g)
        return out + [inner[i] for i in idx.tolist()]


@register_subnet_family
class SlimmableResNet(ResNetWidths, nn.Module):
    """A :class:`CifarResNet` (BN present) whose chosen blocks run at any hidden width ``d``
    on the first ``d`` channels of their tensors: a sub-network family over ``hidden`` shapes
    (depth fixed, each slimmable block 1..full; :class:`~metamorph.models.subnet.ResNetWidths`).

    ``forward(x, hidden)`` runs the network at ``hidden`` (a shape like ``arch.hidden``; ``None``:
    full). ``features(x)`` + ``forward_from(h, hidden)`` split the network at the first slimmable
    block, so that a sandwich step runs the unchanged prefix once.
    """

    def __init__(self, net: CifarResNet, blocks: str | Iterable[str] = ("layer3.2",)) -> None:
        super().__init__()
        if not isinstance(net, CifarResNet):
            raise TypeError(f"expected a CifarResNet, got {type(net).__name__}")
        if not net.arch.bn:
            raise ValueError(
                "slimmable training needs BatchNorm (BN statistics are recalibrated per width); "
                "start from an unfolded network"
            )
        self.net = net
        self.blocks = resolve_blocks(net.arch, blocks)
        self.start = self.blocks[0]
        self.full_shape: Shape = [list(s) for s in net.arch.hidden]
        self.calibrated: dict[str, BNStats] = {}
        # trained width ratios (min, max), for telling seen from unseen widths; set by the task
        self.trained_ratios: tuple[float, float] | None = None
        # () -> normalized calibration batches, for widths without stored BN statistics (set by
        # SlimmableModule.subnet_family when data is given)
        self.calibration_source = None
        self._templates: OrderedDict[str, nn.Module] = OrderedDict()

    # ------------------------------------------------------------------ family
    family_name = "slimmable"
    shape_kind = "slimmable"

    @property
    def base_arch(self):
        return self.net.arch

    def width_ranges(self) -> dict[str, tuple[int, int]]:
        return {b: (1, self.full_width(b)) for b in self.blocks}

    def is_seen(self, hidden) -> bool:
        """Every slimmable block inside the trained width ratios (all widths when unknown)."""
        if [len(st) for st in hidden] != [len(st) for st in self.full_shape]:
            return False  # the depth never varies in training
        if self.trained_ratios is None:
            return True
        lo, hi = self.trained_ratios
        for b in self.blocks:
            s, j = (int(v) for v in b.removeprefix("layer").split("."))
            full = self.full_width(b)
            if not lo * full - 1e-6 <= hidden[s - 1][j] <= hi * full + 1e-6:
                return False
        return True

    def trained_gamma_range(self) -> tuple[float, float] | None:
        if self.trained_ratios is None:
            return None
        lo, hi = self.trained_ratios
        return (max(0.0, 1 - hi), min(1.0, 1 - lo))

    def prepare(self, descs, recalibrate: bool = False) -> None:
        """Recalibrate the BN statistics of every width of ``descs`` that has none stored (all of
        them with ``recalibrate``) on the batches of :attr:`calibration_source`."""
        todo = [as_lists(self.validate(d)) for d in descs]
        todo = [h for h in todo if recalibrate or not self.is_calibrated(h)]
        if not todo:
            return
        if self.calibration_source is None:
            raise ValueError(
                f"widths {[h for h in todo][:3]} have no recalibrated BN statistics and no "
                "training data was given to compute them"
            )
        batches = self.calibration_source()
        for h in todo:
            self.calibrate(h, batches)

    def check_shape(self, hidden: Shape) -> None:
        self.validate(hidden)

    def forward_at(self, x: torch.Tensor, hidden) -> torch.Tensor:
        """Evaluation logits at ``hidden``: the sliced shared tensors with this width's
        recalibrated BN statistics when they exist (as :meth:`materialize` carries them)."""
        hidden = as_lists(self.validate(hidden))
        state = self.sliced_state(hidden, detach=True)
        state.update(self.calibrated.get(shape_key(hidden), {}))
        with torch.device("meta"):
            mod = CifarResNet(self.arch_for(hidden))
        return functional_call(mod.eval(), state, (x,))

    @classmethod
    def example(cls) -> SlimmableResNet:
        torch.manual_seed(0)
        net = CifarResNet(cifar_resnet_arch(depth=8, stage_widths=[4, 8, 8]))
        for m in net.modules():  # non-trivial BN statistics, so slicing them matters
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        return cls(net.eval(), "all")

    # ------------------------------------------------------------------ shapes

    def shape_for_ratio(self, ratio: float) -> Shape:
        """Every slimmable block at ``max(1, round(ratio * full))``."""
        chosen = set(self.blocks)
        return [
            [
                max(1, round(w * ratio)) if f"layer{s + 1}.{b}" in chosen else w
                for b, w in enumerate(stage)
            ]
            for s, stage in enumerate(self.full_shape)
        ]

    # ------------------------------------------------------------------ tensors
    def sliced_state(self, hidden: Shape, detach: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the network at ``hidden`` (views of the shared ones)."""
        self.check_shape(hidden)
        state = self.net.state_dict(keep_vars=True)
        out = {}
        for k, v in state.items():
            parts = k.split(".")
            block = ".".join(parts[:2])
            d = None
            if block in self.blocks:
                s, b = (int(v) for v in block.removeprefix("layer").split("."))
                d = hidden[s - 1][b]
            if d is not None and parts[2] in ("conv1", "bn1") and v.dim() > 0:
                v = v[:d]
            elif d is not None and parts[2] == "conv2" and parts[3] == "weight":
                v = v[:, :d]
            out[k] = v.detach() if detach else v
        return out

    def _template(self, hidden: Shape) -> nn.Module:
        key = shape_key(hidden)
        mod = self._templates.get(key)
        if mod is None:
            with torch.device("meta"):
                mod = Suffix(CifarResNet(self.arch_for(hidden)), self.start)
            self._templates[key] = mod
            if len(self._templates) > 64:
                self._templates.popitem(last=False)
        return mod

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the first slimmable block (the part every width shares)."""
        return forward_to(self.net, self.start, x)

    def forward_from(self, h: torch.Tensor, hidden: Shape | None = None) -> torch.Tensor:
        if hidden is None or hidden == self.full_shape:
            return forward_from(self.net, self.start, h)
        mod = self._template(hidden).train(self.training)
        state = {f"net.{k}": v for k, v in self.sliced_state(hidden).items()}
        return functional_call(mod, state, (h,))

    def forward(self, x: torch.Tensor, hidden: Shape | None = None) -> torch.Tensor:
        return self.forward_from(self.features(x), hidden)

    # ------------------------------------------------------------------ BN recalibration
    @torch.no_grad()
    def calibrate(self, hidden: Shape, batches: Iterable) -> BNStats:
        """Re-estimate every BN layer's statistics at ``hidden`` from ``batches`` (normalized
        ``(x, y)`` or ``x``; train mode, no gradients, cumulative average); stores and returns them."""
        net = self.materialize(hidden, use_calibrated=False)
        stats = recalibrate_batchnorm(net, batches)
        self.calibrated[shape_key(hidden)] = stats
        return stats

    @torch.no_grad()
    def materialize(self, hidden: Shape, use_calibrated: bool = True) -> CifarResNet:
        """A standalone plain :class:`CifarResNet` at ``hidden`` (copies of the sliced tensors),
        with that width's recalibrated BN statistics when they exist (``use_calibrated``)."""
        hidden = as_lists(self.validate(hidden))
        device = next(self.net.parameters()).device
        net = CifarResNet(self.arch_for(hidden)).to(device)
        net.load_state_dict({k: v.clone() for k, v in self.sliced_state(hidden, True).items()})
        stats = self.calibrated.get(shape_key(hidden)) if use_calibrated else None
        if stats is not None:
            net.load_state_dict({k: v.to(device) for k, v in stats.items()}, strict=False)
        if hasattr(self.net, "meta"):
            net.meta = dict(self.net.meta)
        return net.eval()

    def is_calibrated(self, hidden: Shape) -> bool:
        return shape_key(hidden) in self.calibrated
