"""Training-time shape sampling for metamorphic networks (stateless: seeded by the step)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from metamorph.hypernet.metanet import MetaResNet, Shape

MODES = ("uniform", "per_block", "sandwich")


@dataclass
class SamplingConfig:
    """``uniform``: one relative width for every metamorphic block; ``per_block``: independent
    widths; ``sandwich``: smallest, largest, then random shapes in turn (slimmable rule).
    Every ``full_width_every``-th step uses the full (pretrained) shape, where the
    reconstruction loss applies (0 disables forced full-width steps).

    ``widths_per_step``: shapes per training batch (losses averaged over them); they are the
    sampler's draws ``step * n ... step * n + n - 1``, so ``sandwich`` with 3 gives the smallest,
    the largest and a random shape every step, and ``full_width_every: 2`` with 2 gives the
    full width and a random shape every step. 1 is NeuMeta's one shape per batch."""

    mode: str = "uniform"
    full_width_every: int = 4
    widths_per_step: int = 1
    depth_prob: float = 0.5  # when depth varies: probability of sampling a shallower network
    extra: dict = field(default_factory=dict)


def width_range(net: MetaResNet, block: str) -> tuple[int, int]:
    return net.trained_width_range(block)


class ShapeSampler:
    """Draws the shape of each training step from ``(seed, step)`` alone, so resuming from a
    checkpoint continues the exact same sequence."""

    def __init__(self, net: MetaResNet, cfg: SamplingConfig, seed: int = 0) -> None:
        if cfg.mode not in MODES:
            raise ValueError(f"unknown sampling mode {cfg.mode!r}; choose one of {MODES}")
        if int(cfg.widths_per_step) < 1:
            raise ValueError(
                f"task.sampling.widths_per_step={cfg.widths_per_step}; it must be >= 1"
            )
        self.net = net
        self.cfg = cfg
        self.seed = int(seed)

    def is_full_step(self, step: int) -> bool:
        n = self.cfg.full_width_every
        return n > 0 and step % n == 0

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def _depth(self, g: torch.Generator) -> list[int]:
        base = self.net.base_arch.hidden
        choices = self.net.spec.depth_choices
        if not choices or torch.rand((), generator=g).item() >= self.cfg.depth_prob:
            return [len(s) for s in base]
        out = []
        for stage in base:
            allowed = sorted({min(c, len(stage)) for c in choices})
            out.append(allowed[int(torch.randint(len(allowed), (), generator=g))])
        return out

    def sample_step(self, step: int) -> list[Shape]:
        """The shapes of training step ``step`` (``widths_per_step`` of them)."""
        n = int(self.cfg.widths_per_step)
        return [self.sample(step * n + j) for j in range(n)]

    def sample(self, step: int) -> Shape:
        net = self.net
        if self.is_full_step(step):
            return net.full_shape
        g = self.generator(step)
        depth = self._depth(g)
        mode = self.cfg.mode
        u_all = torch.rand((), generator=g).item()
        if mode == "sandwich":
            phase = step % 3
            u_all = 0.0 if phase == 0 else (1.0 if phase == 1 else u_all)
        shape = []
        for s, stage in enumerate(net.base_arch.hidden):
            row = []
            for b in range(depth[s]):
                name = f"layer{s + 1}.{b}"
                if name not in net.meta_blocks:
                    row.append(stage[b])
                    continue
                lo, hi = width_range(net, name)
                u = torch.rand((), generator=g).item() if mode == "per_block" else u_all
                row.append(min(hi, lo + int(u * (hi - lo + 1))))
            shape.append(row)
        return shape
