"""Physical channel pruning of the block-hidden channels, with the channel criterion as a parameter:
one implementation for GeneCAI's pruning phase, the NeuMeta pruning baselines and the methods to
come (NN-Factory masks, Bespoke, Learngene).

Only the hidden channels of each BasicBlock (``conv1`` out = ``bn1`` = ``conv2`` in) are pruned;
the block outputs, the stem and everything on the residual stream are coupled through the
shortcuts and are left alone. Channels are ranked by a saliency criterion:

- ``taylor``: first-order Taylor ``sum_images |sum_hw a * dL/da|`` of the hidden activation
  (Molchanov et al.), from the gradients on a search set;
- ``grad``: ``sum |dL/da|``, the literal gradient-based ordering of GeneCAI's code;
- ``l1``: L1 norm of ``conv1``'s (effective) output filter (no data).

:class:`ChannelMasks` applies a pruning with masks (a forward hook zeroing the least salient
channels after ``bn1``; the ReLU keeps them zero), which is fast and exact for searching;
:func:`prune_physical` rebuilds the network physically smaller (``hidden`` reduced, kept channels
copied, low-rank layers kept), so it stays a plain ``CifarResNet`` (or a low-rank one) that
:func:`metamorph.io.save_model` stores. At least one hidden channel is always kept.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from metamorph.models.lowrank import Tucker2Conv, build_lowrank, lowrank_layers
from metamorph.models.resnet_cifar import BasicBlock, CifarResNet
from metamorph.models.segments import block_position, capture

CRITERIA = ("taylor", "grad", "l1")


def prunable_blocks(model: CifarResNet) -> list[str]:
    """Names of the BasicBlocks whose hidden channels can be pruned (``layer{s}.{b}``)."""
    return [n for n, m in model.named_modules() if isinstance(m, BasicBlock)]


def hidden_width(model: CifarResNet, block: str) -> int:
    s, b = block_position(block)
    return model.arch.hidden[s][b]


def _producer(conv: nn.Module) -> tuple[str, nn.Conv2d]:
    """The conv (suffix, module) producing ``conv``'s output channels."""
    if isinstance(conv, Tucker2Conv):
        return (".last", conv.last) if conv.last is not None else (".core", conv.core)
    return "", conv


def _consumer(conv: nn.Module) -> tuple[str, nn.Conv2d]:
    """The conv (suffix, module) reading ``conv``'s input channels."""
    if isinstance(conv, Tucker2Conv):
        return (".first", conv.first) if conv.first is not None else (".core", conv.core)
    return "", conv


def _effective_weight(conv: nn.Module) -> torch.Tensor:
    return conv.effective_weight() if isinstance(conv, Tucker2Conv) else conv.weight.detach()


def channel_saliency(
    model: CifarResNet,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    criterion: str = "taylor",
    batch_size: int = 250,
) -> dict[str, torch.Tensor]:
    """Saliency of every hidden channel, ``{block: (C,) float64}`` (higher = more important).

    ``a`` is the hidden activation (after ReLU, the input of ``conv2``) and ``dL/da`` the
    gradient of the summed cross-entropy on ``(x, y)`` (normalized images, labels):
    ``taylor``: ``sum_images |sum_hw a * dL/da|``; ``grad``: ``sum_images sum_hw |dL/da|``
    (GeneCAI code's literal ordering); ``l1``: L1 norm of ``conv1``'s output filter (no data)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown saliency criterion {criterion!r}; choose one of {CRITERIA}")
    blocks = prunable_blocks(model)
    if criterion == "l1":
        return {
            b: _effective_weight(model.get_submodule(f"{b}.conv1"))
            .abs()
            .sum((1, 2, 3))
            .to(torch.float64)
            for b in blocks
        }
    if x is None or y is None:
        raise ValueError(f"the {criterion} criterion needs the search images and labels")
    net = copy.deepcopy(model).eval()
    net.requires_grad_(True)
    scores = {b: torch.zeros(hidden_width(model, b), dtype=torch.float64) for b in blocks}
    with capture(net, [f"{b}.conv2" for b in blocks], what="input", retain_grad=True) as acts:
        for i in range(0, len(y), batch_size):
            acts.clear()
            net.zero_grad(set_to_none=True)
            loss = F.cross_entropy(
                net(x[i : i + batch_size]), y[i : i + batch_size], reduction="sum"
            )
            loss.backward()
            for b in blocks:
                a = acts[f"{b}.conv2"]
                if criterion == "taylor":
                    t = (a.detach() * a.grad).sum((2, 3)).abs().sum(0)
                else:
                    t = a.grad.abs().sum((0, 2, 3))
                scores[b] += t.to(torch.float64)
    return scores


def channel_order(saliency: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per block, channel indices from least to most salient (ties by index, deterministic)."""
    out = {}
    for b, s in saliency.items():
        idx = torch.arange(len(s))
        # stable sort on saliency: least salient first
        out[b] = idx[torch.sort(s, stable=True).indices]
    return out


def kept_channels(order: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """Sorted indices of the channels that survive pruning the first ``n_pruned`` of ``order``."""
    n_pruned = min(max(0, int(n_pruned)), len(order) - 1)
    return torch.sort(order[n_pruned:]).values


class ChannelMasks:
    """Forward hooks zeroing pruned hidden channels after each block's ``bn1``."""

    def __init__(self, model: CifarResNet, blocks: list[str] | None = None) -> None:
        self.model = model
        self.blocks = blocks or prunable_blocks(model)
        self.masks: dict[str, torch.Tensor | None] = {b: None for b in self.blocks}
        self._handles = [
            model.get_submodule(f"{b}.bn1").register_forward_hook(self._hook(b))
            for b in self.blocks
        ]

    def _hook(self, name: str):
        def fn(_m, _inp, out):
            mask = self.masks[name]
            return out if mask is None else out * mask

        return fn

    def set(self, keep: dict[str, torch.Tensor]) -> None:
        """Keep only ``keep[block]`` (channel indices) in each listed block; others unmasked."""
        for b in self.blocks:
            idx = keep.get(b)
            c = hidden_width(self.model, b)
            if idx is None or len(idx) == c:
                self.masks[b] = None
                continue
            w = self.model.fc.weight
            m = torch.zeros(c, dtype=w.dtype, device=w.device)
            m[idx] = 1.0
            self.masks[b] = m.view(1, -1, 1, 1)

    def clear(self) -> None:
        self.masks = {b: None for b in self.blocks}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def prune_physical(model: CifarResNet, keep: dict[str, torch.Tensor]) -> CifarResNet:
    """A new, physically smaller network keeping only ``keep[block]`` hidden channels of each
    listed block (blocks not listed keep all); low-rank layers stay low-rank."""
    arch = copy.deepcopy(model.arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for block, idx in keep.items():
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        s, b = block_position(block)
        arch.hidden[s][b] = len(idx)
        suffix, _ = _producer(model.get_submodule(f"{block}.conv1"))
        for p in ("weight", "bias"):
            key = f"{block}.conv1{suffix}.{p}"
            if key in state:
                state[key] = state[key][idx]
        for p in ("weight", "bias", "running_mean", "running_var"):
            key = f"{block}.bn1.{p}"
            if key in state:
                state[key] = state[key][idx]
        suffix, _ = _consumer(model.get_submodule(f"{block}.conv2"))
        key = f"{block}.conv2{suffix}.weight"
        state[key] = state[key][:, idx]
    ranks = lowrank_layers(model)
    new = build_lowrank({**arch.to_dict(), "lowrank": {n: list(r) for n, r in ranks.items()}})
    new.load_state_dict(state)
    new.to(model.fc.weight.device)
    if hasattr(model, "meta"):
        new.meta = copy.deepcopy(model.meta)
    return new.train(model.training)


def keep_most_salient(
    saliency: dict[str, torch.Tensor], widths: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Per block of ``widths``, the sorted indices of its ``widths[block]`` most salient channels."""
    order = channel_order({b: saliency[b] for b in widths})
    return {b: kept_channels(order[b], len(order[b]) - int(w)) for b, w in widths.items()}


def prune_to_widths(
    model: CifarResNet,
    widths: dict[str, int],
    criterion: str = "l1",
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> tuple[CifarResNet, dict[str, torch.Tensor]]:
    """``model`` pruned physically to ``widths`` (``{block: hidden width}``), keeping each block's
    most salient channels under ``criterion`` (:func:`channel_saliency`); returns the network and
    the kept channel indices."""
    keep = keep_most_salient(channel_saliency(model, x, y, criterion), widths)
    return prune_physical(model, keep), keep
