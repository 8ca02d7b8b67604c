"""Stitch-layer initialisation: least squares on features ("snnet") or the transposed mean of the
learned distillation maps ("ours").

A stitch layer (``metamorph.models.stitched.make_stitch``: 1x1 conv or linear, with bias) maps
the output of a front block (width ``c_in``) to the input of a back block (width ``c_out``).
SN-Net fits it by least squares on the features of 100 training images
(``[x, 1] W^T = y`` through the pseudo-inverse, ``ps_inv``), averaging the solutions of the
positions that share a layer. Learngene Pool copies the transposed mean of the small auxiliary
model's learned maps ``M_k`` (teacher width -> small width, so ``M^T`` maps small -> large) into
every small->large stitch layer; the bias keeps its default init (``initialize_stitching_weights``,
mode ``ours``).
"""

from __future__ import annotations

import torch
from torch import nn

INITS = ("ours", "snnet", "random")


def feature_rows(h: torch.Tensor) -> torch.Tensor:
    """Features as rows: ``(B, C, H, W) -> (B*H*W, C)``, ``(B, N, D) -> (B*N, D)``."""
    if h.dim() == 4:
        return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    return h.reshape(-1, h.shape[-1])


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` minimising ``|x W^T + b - y|`` for rows ``x`` (n, c_in), ``y`` (n, c_out), via
    the pseudo-inverse of ``[x, 1]`` (in float64)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"least squares needs as many rows in x ({x.shape[0]}) as in y ({y.shape[0]})"
        )
    xa = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], 1)
    sol = torch.linalg.pinv(xa) @ y.double()  # (c_in + 1, c_out)
    return sol[:-1].T.contiguous().float(), sol[-1].contiguous().float()


def set_stitch(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Copy a ``(c_out, c_in)`` matrix (and bias) into a 1x1 conv or linear stitch layer."""
    w = layer.weight
    if weight.shape != w.shape[:2]:
        raise ValueError(
            f"stitch layer is {w.shape[1]} -> {w.shape[0]} but the matrix is "
            f"{weight.shape[1]} -> {weight.shape[0]}"
        )
    with torch.no_grad():
        w.copy_(weight.reshape(w.shape).to(w))
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias))


def init_least_squares(layer: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Least-squares init from ``(front features, back input features)`` pairs, one per position
    sharing ``layer``; the solutions are averaged (SN-Net)."""
    if not pairs:
        raise ValueError("least-squares init needs at least one (x, y) feature pair")
    ws, bs = zip(*(least_squares(feature_rows(x), feature_rows(y)) for x, y in pairs))
    set_stitch(layer, torch.stack(ws).mean(0), torch.stack(bs).mean(0))


def init_transposed_mean(layer: nn.Module, maps: list[torch.Tensor]) -> None:
    """Learngene Pool's init: the mean of the learned maps ``(small, large)`` that fit this
    layer's widths, transposed to ``(large, small)``; the bias is left as it is."""
    c_out, c_in = layer.weight.shape[:2]
    fit = [m for m in maps if tuple(m.shape) == (c_in, c_out)]
    if not fit:
        raise ValueError(
            f"no learned transformation map of shape {c_in}x{c_out} for a {c_in} -> {c_out} "
            "stitch layer: distil the small auxiliary model with positions at this stage "
            "(positions=front_end) or use init=snnet"
        )
    set_stitch(layer, torch.stack(fit).mean(0).T)
