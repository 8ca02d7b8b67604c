"""Running and editing a network by blocks: names, block-range forward, segment replacement and
feature capture, in one place for every method that cuts a network (pruning, slimmable prefixes,
low-rank layer swaps, saliency and calibration hooks; next NN-Factory / Bespoke / Learngene).

Blocks are named ``layer{s}.{b}`` (1-based stage, 0-based block) and indexed in forward order;
:meth:`CifarResNet.forward` runs any block range (``start`` / ``stop``), these helpers address it
by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def block_names(arch) -> list[str]:
    """Every BasicBlock name of ``arch`` (a :class:`ResNetArch`) in forward order."""
    return [f"layer{s + 1}.{b}" for s, stage in enumerate(arch.hidden) for b in range(len(stage))]


def block_position(name: str) -> tuple[int, int]:
    """``"layer3.2"`` -> ``(2, 2)``: 0-based stage and block of a block name."""
    s, b = name.removeprefix("layer").split(".")
    return int(s) - 1, int(b)


def resolve_blocks(arch, blocks: str | Iterable[str]) -> list[str]:
    """``"all"`` / ``["all"]`` or a list of block names -> validated names in forward order."""
    names = block_names(arch)
    if isinstance(blocks, str):
        blocks = [blocks]
    blocks = list(blocks)
    if blocks == ["all"]:
        return names
    unknown = [b for b in blocks if b not in names]
    if unknown or not blocks:
        raise ValueError(f"unknown blocks {unknown or blocks}; this network has {names} (or 'all')")
    return [n for n in names if n in blocks]


def _index_of(model: nn.Module, name: str) -> int:
    names = block_names(model.arch)
    if name not in names:
        raise ValueError(f"no block {name!r} in this network")
    return names.index(name)


def forward_to(model: nn.Module, start: str | None, x: torch.Tensor) -> torch.Tensor:
    """The input of block ``start`` (``None``: the image itself)."""
    if start is None:
        return x
    return model(x, stop=_index_of(model, start))


def forward_from(model: nn.Module, start: str | None, h: torch.Tensor) -> torch.Tensor:
    """Logits from the input ``h`` of block ``start`` (``None``: from the image)."""
    if start is None:
        return model(h)
    return model(h, start=_index_of(model, start))


class Suffix(nn.Module):
    """``Suffix(net, start)(h) = forward_from(net, start, h)``: the part of ``net`` from block
    ``start`` on as a module (for ``torch.func.functional_call``; parameter names ``net.*``)."""

    def __init__(self, net: nn.Module, start: str | None) -> None:
        super().__init__()
        self.net = net
        self.start = start

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return forward_from(self.net, self.start, h)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``root`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@contextmanager
def capture(
    model: nn.Module, names: Iterable[str], what: str = "output", retain_grad: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the ``input`` (first positional) or ``output`` of the submodules ``names`` during
    the forwards run inside the block; ``retain_grad`` keeps their gradients (saliency)."""
    if what not in ("input", "output"):
        raise ValueError(f"capture what={what!r}; choose input or output")
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre(_m, inp):
            t = inp[0]
            if retain_grad:
                t.retain_grad()
            seen[name] = t

        def post(_m, _inp, out):
            if retain_grad:
                out.retain_grad()
            seen[name] = out

        return pre if what == "input" else post

    handles = []
    for n in names:
        m = model.get_submodule(n)
        reg = m.register_forward_pre_hook if what == "input" else m.register_forward_hook
        handles.append(reg(hook(n)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
