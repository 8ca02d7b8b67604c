"""Tucker-2 low-rank convolutions (GeneCAI's decomposition phase) and the ``cifar_resnet_lowrank``
model family.

A k x k convolution ``W`` of shape ``(C_out, C_in, k, k)`` is approximated on its two channel
modes: ``W ~= core x_0 U_out x_1 U_in`` with ``U_in: (C_in, r_in)``, ``U_out: (C_out, r_out)`` and
``core: (r_out, r_in, k, k)``. As a module this is ``1x1 conv C_in -> r_in`` (``first``), the
``k x k`` core ``r_in -> r_out`` (``core``, carrying the stride and padding) and
``1x1 conv r_out -> C_out`` (``last``, carrying the original bias).

A mode kept at full rank needs no factor: its orthogonal ``U`` is absorbed into the core (exact),
so ``first`` (``r_in == C_in``) or ``last`` (``r_out == C_out``) is ``None`` and costs nothing.
With both modes at full rank the original convolution itself is kept, unchanged.

Ranks come from ``bins`` levels of the channel count, GeneCAI's ``r = int(C * i / bins)``,
``i = 1..bins`` (deduplicated and at least 1 for tiny layers); the top level is ``C`` (uncompressed).
The factors are a truncated HOSVD (``torch.linalg.svd`` of the two unfoldings, in float64),
optionally refined by HOOI iterations; they are computed once per layer and cached per rank pair.

A :class:`CifarResNet` holding :class:`Tucker2Conv` layers is stored in the project's model format
as family ``cifar_resnet_lowrank`` (its ``ResNetArch`` plus a ``lowrank`` map of ranks); the family
is registered here, at the models layer, so ``metamorph.load`` reads such files without importing
any search code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from metamorph.models.registry import register_family
from metamorph.models.resnet_cifar import CifarResNet, ResNetArch
from metamorph.models.segments import set_submodule

LOWRANK_FAMILY = "cifar_resnet_lowrank"
RankPair = tuple[int | None, int | None]  # (r_in, r_out); None = that mode is not factored


def rank_levels(channels: int, bins: int = 8) -> list[int]:
    """GeneCAI's rank bins ``int(C * i / bins)`` for ``i = 1..bins``, at least 1, deduplicated
    (ascending; the last is ``channels``, i.e. uncompressed)."""
    if channels < 1 or bins < 1:
        raise ValueError(f"need channels >= 1 and bins >= 1, got {channels}, {bins}")
    return sorted({max(1, int(channels * i / bins)) for i in range(1, bins + 1)})


class Tucker2Conv(nn.Module):
    """``first`` (1x1, C_in -> r_in) -> ``core`` (k x k, r_in -> r_out) -> ``last`` (1x1,
    r_out -> C_out, with the bias). ``first``/``last`` are ``None`` for a mode kept at full rank."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        r_in: int | None = None,
        r_out: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        # ranks may exceed the channel counts after those channels were pruned
        if (r_in is not None and r_in < 1) or (r_out is not None and r_out < 1):
            raise ValueError(f"ranks must be >= 1, got ({r_in}, {r_out})")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.r_in, self.r_out = r_in, r_out
        core_in = r_in if r_in is not None else in_channels
        core_out = r_out if r_out is not None else out_channels
        self.first = nn.Conv2d(in_channels, r_in, 1, bias=False) if r_in is not None else None
        self.core = nn.Conv2d(
            core_in, core_out, kernel_size, stride, padding, bias=bias and r_out is None
        )
        self.last = nn.Conv2d(r_out, out_channels, 1, bias=bias) if r_out is not None else None

    @classmethod
    def like(cls, conv: nn.Conv2d, r_in: int | None, r_out: int | None) -> Tucker2Conv:
        """An (uninitialised) Tucker-2 layer replacing ``conv`` at ranks ``(r_in, r_out)``."""
        if conv.groups != 1 or conv.dilation not in ((1, 1), 1):
            raise ValueError("only plain convolutions (groups=1, dilation=1) can be decomposed")
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            r_in,
            r_out,
            bias=conv.bias is not None,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)

    @property
    def ranks(self) -> RankPair:
        return self.r_in, self.r_out

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.core.kernel_size

    @property
    def stride(self) -> tuple[int, int]:
        return self.core.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first is not None:
            x = self.first(x)
        x = self.core(x)
        if self.last is not None:
            x = self.last(x)
        return x

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The equivalent ``(C_out, C_in, k, k)`` kernel."""
        w = self.core.weight
        if self.first is not None:
            w = torch.einsum("oikl,ic->ockl", w, self.first.weight[:, :, 0, 0])
        if self.last is not None:
            w = torch.einsum("oikl,po->pikl", w, self.last.weight[:, :, 0, 0])
        return w

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, ranks=({self.r_in}, {self.r_out})"


def _leading_left(mat: torch.Tensor, r: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(mat, full_matrices=False)
    return u[:, :r]


@torch.no_grad()
def tucker2_factors(
    weight: torch.Tensor, r_in: int, r_out: int, iters: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_out, core, U_in)`` of a truncated HOSVD (+ ``iters`` HOOI sweeps), in float64."""
    w = weight.detach().to(torch.float64)
    c_out, c_in = w.shape[:2]
    u_out = _leading_left(w.reshape(c_out, -1), r_out)
    u_in = _leading_left(w.transpose(0, 1).reshape(c_in, -1), r_in)
    for _ in range(iters):
        y = torch.einsum("oikl,ir->orkl", w, u_in)
        u_out = _leading_left(y.reshape(c_out, -1), r_out)
        y = torch.einsum("oikl,or->rikl", w, u_out)
        u_in = _leading_left(y.transpose(0, 1).reshape(c_in, -1), r_in)
    core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)
    return u_out, core, u_in


@torch.no_grad()
def decompose_conv(
    conv: nn.Conv2d,
    r_in: int,
    r_out: int,
    iters: int = 0,
    absorb_full: bool = True,
    bases: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module:
    """``conv`` at ranks ``(r_in, r_out)``: the conv itself (a deep copy) at full ranks, else a
    :class:`Tucker2Conv`. ``absorb_full=False`` keeps explicit (orthogonal) factors for modes at
    full rank (exact up to rounding). ``bases``: precomputed full HOSVD bases ``(U_out, U_in)``
    (float64) of this conv's weight, truncated here (only used when ``iters == 0``)."""
    c_out, c_in = conv.out_channels, conv.in_channels
    if not (1 <= r_in <= c_in and 1 <= r_out <= c_out):
        raise ValueError(f"ranks ({r_in}, {r_out}) outside 1..({c_in}, {c_out})")
    if absorb_full and r_in == c_in and r_out == c_out:
        return copy.deepcopy(conv)
    w = conv.weight.detach().to(torch.float64)
    if bases is not None and iters == 0:
        u_out, u_in = bases[0][:, :r_out], bases[1][:, :r_in]
        core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)
    else:
        u_out, core, u_in = tucker2_factors(w, r_in, r_out, iters)
    keep_in = not (absorb_full and r_in == c_in)
    keep_out = not (absorb_full and r_out == c_out)
    if not keep_in:  # U_in is square orthogonal: fold it back into the core
        core = torch.einsum("rskl,is->rikl", core, u_in)
    if not keep_out:
        core = torch.einsum("rskl,or->oskl", core, u_out)
    layer = Tucker2Conv.like(conv, r_in if keep_in else None, r_out if keep_out else None)
    dt = conv.weight.dtype
    layer.core.weight.copy_(core.to(dt))
    if layer.first is not None:
        layer.first.weight.copy_(u_in.t().reshape(r_in, c_in, 1, 1).to(dt))
    if layer.last is not None:
        layer.last.weight.copy_(u_out.reshape(c_out, r_out, 1, 1).to(dt))
    if conv.bias is not None:
        target = layer.last if layer.last is not None else layer.core
        target.bias.copy_(conv.bias)
    return layer


class TuckerCache:
    """Decompositions of the k x k convs of one network, computed once per (layer, rank pair).

    With ``iters == 0`` (plain HOSVD) the two full SVD bases of each layer are computed once and
    every rank pair is a truncation of them. Pickling drops the cached modules (workers rebuild
    them lazily)."""

    def __init__(self, model: nn.Module, names: list[str], iters: int = 0) -> None:
        self.model = model
        self.names = list(names)
        self.iters = int(iters)
        self._bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layers: dict[tuple[str, int, int], nn.Module] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_bases"], state["_layers"] = {}, {}
        return state

    def original(self, name: str) -> nn.Conv2d:
        return self.model.get_submodule(name)

    def _bases_of(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._bases:
            w = self.original(name).weight.detach().to(torch.float64)
            c_out, c_in = w.shape[:2]
            u_out = torch.linalg.svd(w.reshape(c_out, -1), full_matrices=False)[0]
            u_in = torch.linalg.svd(w.transpose(0, 1).reshape(c_in, -1), full_matrices=False)[0]
            self._bases[name] = (u_out, u_in)
        return self._bases[name]

    def layer(self, name: str, r_in: int, r_out: int) -> nn.Module:
        key = (name, int(r_in), int(r_out))
        mod = self._layers.get(key)
        if mod is None:
            conv = self.original(name)
            bases = self._bases_of(name) if self.iters == 0 else None
            mod = decompose_conv(conv, r_in, r_out, self.iters, bases=bases).eval()
            mod.requires_grad_(False)
            self._layers[key] = mod
        return mod

    def __len__(self) -> int:
        return len(self._layers)


# ------------------------------------------------------------------------------------------
# Networks with low-rank layers: build, inspect, save, load
# ------------------------------------------------------------------------------------------


def lowrank_layers(model: nn.Module) -> dict[str, RankPair]:
    """``{module name: (r_in, r_out)}`` of every :class:`Tucker2Conv` in ``model``."""
    return {n: m.ranks for n, m in model.named_modules() if isinstance(m, Tucker2Conv)}


def build_lowrank(arch: dict) -> CifarResNet:
    """Rebuild a ``cifar_resnet_lowrank`` network from its architecture dict (weights uninitialised)."""
    arch = dict(arch)
    spec = arch.pop("lowrank", {}) or {}
    net = CifarResNet(ResNetArch.from_dict(arch))
    for name, ranks in spec.items():
        r_in, r_out = ranks
        set_submodule(net, name, Tucker2Conv.like(net.get_submodule(name), r_in, r_out))
    return net


def lowrank_arch(model: nn.Module) -> dict:
    """The stored architecture of a low-rank network: its ``ResNetArch`` plus the rank map."""
    arch = model.arch.to_dict()
    arch["lowrank"] = {n: list(r) for n, r in lowrank_layers(model).items()}
    return arch


register_family(
    LOWRANK_FAMILY,
    CifarResNet,
    build_lowrank,
    arch_of=lowrank_arch,
    matches=lambda m: bool(lowrank_layers(m)),
)
