"""Per-channel statistics calibration of folded networks (the BN-free analogue of recalibrating
BatchNorm statistics for a slimmed width).

A network whose BatchNorm is folded into its convolutions (as NeuMeta emits them) has no running
statistics to recompute when its width or its weights change. :func:`match_channel_stats` instead
rescales and shifts every output channel of every biased convolution, in forward order, so that
its mean and standard deviation over a few calibration images equal those of the *same channel of
the same-named convolution* of a reference network (the prepared full network). The change is
folded into the conv's weight and bias, so the result is again a plain network.

Channel correspondence: by default channel ``j`` of a conv is matched to channel ``j`` of the
reference conv of the same name, which is exact for the anchored INR (the first ``d`` hidden
channels of the importance-ordered prepared network) and for absolute coordinates. ``index_maps``
overrides it per conv: with NeuMeta's relative coordinates channel ``j`` of width ``d`` sits at the
coordinate of reference channel ``floor(j * D / d)`` (:func:`relative_index_map`). Channels beyond
the reference's width (widths above the pretrained one) and convs missing from the reference are
left unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ChannelStats:
    """Mean and standard deviation of each output channel of one conv, over (N, H, W)."""

    mean: torch.Tensor
    std: torch.Tensor


def _biased_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    unbiased = [n for n, m in convs.items() if m.bias is None]
    if unbiased:
        raise ValueError(
            f"statistics calibration needs folded convolutions with a bias; {unbiased[:3]} have "
            "none (a network with BatchNorm: recalibrate its BN statistics instead, or fold it "
            "with metamorph.models.fold_batchnorm first)"
        )
    return convs


@torch.no_grad()
def channel_stats(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> dict[str, ChannelStats]:
    """Per-channel output statistics of every conv of ``model`` on ``images`` (float64 sums)."""
    convs = _biased_convs(model)
    sums: dict[str, list] = {}

    def hook(name):
        def fn(_m, _inp, out):
            o = out.detach().double().transpose(0, 1).reshape(out.shape[1], -1)
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + o.sum(1)
            s[1] = s[1] + (o * o).sum(1)
            s[2] += o.shape[1]

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in convs.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, (s1, s2, n) in sums.items():
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0.0)
        out[name] = ChannelStats(mean.float(), var.sqrt().float())
    return out


def relative_index_map(width: int, ref_width: int) -> torch.Tensor:
    """Reference channel of each of ``width`` channels under relative coordinates (r / d)."""
    return (torch.arange(width, dtype=torch.float64) * ref_width / width).floor().long()


def remap(reference: dict[str, ChannelStats], index_maps: dict[str, torch.Tensor]) -> dict:
    """``reference`` with the channels of the convs in ``index_maps`` re-indexed."""
    out = dict(reference)
    for name, idx in index_maps.items():
        st = reference[name]
        if int(idx.max()) >= st.mean.numel() or int(idx.min()) < 0:
            raise ValueError(f"index map of {name} points outside its {st.mean.numel()} channels")
        out[name] = ChannelStats(st.mean[idx], st.std[idx])
    return out


@torch.no_grad()
def match_channel_stats(
    model: nn.Module,
    reference: dict[str, ChannelStats],
    images: torch.Tensor,
    eps: float = 1e-5,
    max_scale: float = 10.0,
    index_maps: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Calibrate ``model`` in place to the ``reference`` statistics (see the module docstring).

    One forward pass over all ``images`` at once: each conv's output is corrected inside the
    pass, so every later conv is calibrated on already-calibrated inputs. Channels with
    (near-)zero spread get only the shift; scales are clipped to ``[0, max_scale]``. Returns the
    mean absolute log-scale and mean absolute shift (in reference stds) applied, for reporting.
    """
    convs = _biased_convs(model)
    if len(images) == 0:
        raise ValueError("statistics calibration needs at least one image")
    if index_maps:
        reference = remap(reference, index_maps)
    log_scales, shifts = [], []

    def hook(name, conv):
        def fn(_m, _inp, out):
            ref = reference.get(name)
            if ref is None:
                return out
            c = min(out.shape[1], ref.mean.numel())
            o = out[:, :c].double()
            mean = o.mean(dim=(0, 2, 3))
            std = o.std(dim=(0, 2, 3), unbiased=False)
            r_mean = ref.mean[:c].to(o)
            r_std = ref.std[:c].to(o)
            scale = torch.where(std > eps, r_std / std.clamp_min(eps), torch.ones_like(std))
            scale = scale.clamp(0.0, max_scale)
            shift = r_mean - scale * mean
            w = conv.weight
            w[:c] = (w[:c].double() * scale.view(-1, 1, 1, 1)).to(w.dtype)
            conv.bias[:c] = (conv.bias[:c].double() * scale + shift).to(conv.bias.dtype)
            log_scales.append(scale.clamp_min(1e-12).log().abs().mean().item())
            shifts.append((shift.abs() / r_std.clamp_min(eps)).mean().item())
            new = out.clone()
            new[:, :c] = (o * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(out.dtype)
            return new

        return fn

    handles = [m.register_forward_hook(hook(n, m)) for n, m in convs.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        model(images.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n = max(1, len(log_scales))
    return {
        "convs": len(log_scales),
        "mean_abs_log_scale": sum(log_scales) / n,
        "mean_abs_shift": sum(shifts) / n,
    }


def calibrate_to(
    model: nn.Module, reference_model: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """:func:`match_channel_stats` of ``model`` to ``reference_model``'s statistics on ``images``."""
    return match_channel_stats(model, channel_stats(reference_model, images, batch_size), images)


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Re-estimate every BatchNorm layer's running statistics of ``model`` in place from
    ``batches`` (normalized images, or ``(x, y)`` pairs): statistics reset, training mode, no
    gradients, cumulative average (momentum ``None``); the model's mode and momenta are
    restored. Returns the statistics as state-dict entries (copies)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta, was_training = [m.momentum for m in bns], model.training
    device = next(model.parameters()).device
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        n = 0
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            n += 1
        if n == 0:
            raise ValueError("BN recalibration got no batches")
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(BN_STATS)}
