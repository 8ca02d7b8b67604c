"""Accuracy of a sub-network family at many shapes (uniform ratios, depths, custom shapes):
the sweep points of a metamorphic or slimmable network, and :class:`EmittedFamily`, the family
view of a trained metamorphic checkpoint (its evaluation emission)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from metamorph.hypernet.metanet import MetaResNet, Shape
from metamorph.models.metrics import top1
from metamorph.models.subnet import SubnetFamily, as_lists


@dataclass
class SweepPoint:
    """One evaluated shape."""

    label: str
    hidden: Shape
    gamma: float
    seen: bool
    acc: float | None = None
    params: int | None = None
    depth: int | None = None

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "gamma": round(self.gamma, 4),
            "seen": self.seen,
            "acc": self.acc,
            "params": self.params,
            "depth": self.depth,
            "hidden": self.hidden,
        }


def gamma_label(gamma: float) -> str:
    return f"g{gamma:g}"


def is_seen(net: MetaResNet, hidden: Shape) -> bool:
    """Inside the trained width range for every metamorphic block, and a trained depth."""
    return net.is_seen(hidden)


class EmittedFamily(SubnetFamily):
    """A metamorphic network as a family whose members carry a given emission ``emit(hidden)``
    (a checkpoint's evaluation emission: EMA weights, K-sample averaged, kept-BN statistics);
    the shape verbs are the network's own (every other attribute is the network's too)."""

    def __init__(self, net: MetaResNet, emit) -> None:
        self.net = net
        self.emit = emit
        self.family_name = net.family_name

    def __getattr__(self, name):
        if name in ("net", "emit"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.net, name)

    def validate(self, desc):
        return self.net.validate(desc)

    def arch_for(self, desc):
        return self.net.arch_for(desc)

    def describe(self, desc) -> dict:
        return self.net.describe(desc)

    def cost_module(self, desc):
        return self.net.cost_module(desc)

    def full(self):
        return self.net.full()

    def for_ratio(self, gamma: float):
        return self.net.for_ratio(gamma)

    def sample(self, rng):
        return self.net.sample(rng)

    def is_seen(self, desc) -> bool:
        return self.net.is_seen(desc)

    def gamma_of(self, desc) -> float:
        return self.net.gamma_of(desc)

    def trained_gamma_range(self):
        return self.net.trained_gamma_range()

    @torch.no_grad()
    def materialize(self, desc):
        hidden = as_lists(self.validate(desc))
        return self.net.materialize(hidden, emitted=self.emit(hidden))

    def forward_fn(self, desc):
        hidden = as_lists(self.validate(desc))
        emitted = self.emit(hidden)
        return lambda x: self.net(x, hidden, emitted)

    def forward_at(self, x, desc):
        return self.forward_fn(desc)(x)


def sweep_points(
    net,
    gammas: Iterable[float] = (),
    depths: Iterable[int] = (),
    widths_above: Iterable[float] = (),
    custom: Iterable[Shape] = (),
) -> list[SweepPoint]:
    """Uniform-gamma shapes, uniform depths (full width), widths above the pretrained one
    (factors > 1) and custom (e.g. non-uniform) shapes of a width family (a metamorphic or a
    slimmable network: ``shape_for_gamma``, ``width_ranges``, ``is_seen``, ``gamma_of``)."""
    pts = []
    for g in gammas:
        h = net.shape_for_gamma(float(g))
        pts.append(SweepPoint(gamma_label(g), h, float(g), net.is_seen(h)))
    for d in depths:
        h = net.shape_for_gamma(0.0, depth=int(d))
        pts.append(SweepPoint(f"depth{d}", h, 0.0, net.is_seen(h)))
    varying = net.width_ranges()
    for f in widths_above:
        h = []
        for s, stage in enumerate(net.base_arch.hidden):
            h.append(
                [round(w * f) if f"layer{s + 1}.{b}" in varying else w for b, w in enumerate(stage)]
            )
        pts.append(SweepPoint(f"x{f:g}", h, net.gamma_of(h), net.is_seen(h)))
    for i, h in enumerate(custom):
        pts.append(SweepPoint(f"shape{i}", h, net.gamma_of(h), net.is_seen(h)))
    for p in pts:
        p.depth = 2 + 2 * sum(len(s) for s in p.hidden)
    return pts


def random_shapes(net: MetaResNet, n: int, seed: int = 0, depth: bool = False) -> list[Shape]:
    """A fixed seeded set of non-uniform shapes inside the trained range."""
    from metamorph.hypernet.sampling import SamplingConfig, ShapeSampler

    cfg = SamplingConfig(mode="per_block", full_width_every=0, depth_prob=1.0 if depth else 0.0)
    sampler = ShapeSampler(net, cfg, seed=10_000 + seed)
    return [sampler.sample(i + 1) for i in range(n)]


def batch_accuracy(forward, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 (%) of ``forward`` (a network or any ``x -> logits``) over ``(x, y)`` batches."""
    return top1(forward, batches)


def accuracy_at(
    net: MetaResNet,
    emitted: dict[str, torch.Tensor],
    hidden: Shape,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Top-1 (%) of ``net`` at ``hidden`` with the ``emitted`` weights."""
    return batch_accuracy(lambda x: net(x, hidden, emitted), batches)


def count_shape_params(net: MetaResNet, hidden: Shape) -> int:
    return sum(t.numel() for t in net.template(hidden).parameters())
