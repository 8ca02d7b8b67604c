"""Batched augmentation / normalization on NCHW tensors (any device, no per-image loops)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["hwc_to_nchw", "normalize", "random_crop_flip"]


def hwc_to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` numpy array -> contiguous uint8 ``(N, C, H, W)`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _randint(
    high: int, n: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``n`` ints in ``[0, high)``, drawn on the generator's device, returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)


def random_crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    generator: torch.Generator | None = None,
    flip: bool = True,
) -> torch.Tensor:
    """Zero-pad by ``padding``, crop back to ``H x W`` at a random offset per image, and flip
    each image horizontally with probability 0.5 (if ``flip``).

    ``x`` is an ``(N, C, H, W)`` uint8 or float tensor; the output has the same shape, dtype and
    device. ``generator`` (on any device) makes the draws reproducible.
    """
    if x.ndim != 4:
        raise ValueError(f"expected an NCHW tensor, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))  # zeros
    dy = _randint(2 * padding + 1, n, generator, dev)
    dx = _randint(2 * padding + 1, n, generator, dev)
    rows = dy[:, None] + torch.arange(h, device=dev)  # (N, H) rows of the padded image
    cols = dx[:, None] + torch.arange(w, device=dev)  # (N, W)
    if flip:
        do_flip = _randint(2, n, generator, dev).bool()
        cols = torch.where(do_flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None]
    # Advanced indexing around the channel slice gives (N, H, W, C).
    out = x[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def normalize(
    x: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 NCHW (0..255) -> float ``(x / 255 - mean) / std`` per channel.

    A floating-point input is taken to be already scaled to ``[0, 1]``.
    """
    xf = x.to(dtype) / 255.0 if not x.is_floating_point() else x.to(dtype)
    m = torch.as_tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return (xf - m) / s
