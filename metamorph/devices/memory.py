"""Analytic inference memory of a model: parameters plus activations, from forward hooks.

``activation_peak_bytes`` is the largest set of tensors that must be alive at once when every
intermediate is freed as soon as its consumer has run (what an inference runtime with a memory
planner needs at best): at each leaf module, its inputs and outputs plus the inputs still held by
enclosing residual blocks for their shortcut. ``activation_total_bytes`` is every leaf's output
summed (what is held when nothing is freed, e.g. autograd keeping them for backward). Neither is a
process RSS: runtimes add workspaces and arenas on top, which only the runtime can report (CUDA's
``max_memory_allocated``, see :mod:`metamorph.devices.measure`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

MB = 1024 * 1024


@dataclass
class MemoryEstimate:
    params_bytes: int
    buffers_bytes: int
    activation_peak_bytes: int
    activation_total_bytes: int
    input_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Weights + buffers + the activation peak (input included)."""
        return self.params_bytes + self.buffers_bytes + self.activation_peak_bytes

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MB

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_bytes"] = self.peak_bytes
        d["peak_mb"] = round(self.peak_mb, 4)
        return d


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def _holds_shortcut(m: nn.Module) -> bool:
    return hasattr(m, "shortcut")


@torch.no_grad()
def estimate_memory(
    model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> MemoryEstimate:
    """Parameters and activations of one forward pass of ``model`` at ``input_shape``, in bytes of
    ``dtype`` (the parameters counted at that dtype too)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    params = sum(p.numel() for p in model.parameters()) * itemsize
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    held: list[list[torch.Tensor]] = []
    state = {"peak": 0, "total": 0}
    handles = []

    def pre(m, args):
        if _holds_shortcut(m):
            held.append(_tensors(args))

    def post(m, args, out):
        if _holds_shortcut(m):
            held.pop()
        if len(list(m.children())) == 0:
            live = [t for h in held for t in h] + _tensors(args) + _tensors(out)
            state["peak"] = max(state["peak"], _bytes(live))
            state["total"] += _bytes(_tensors(out))

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    was_training = model.training
    device = next(model.parameters()).device
    x = torch.zeros(input_shape, device=device)
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    scale = itemsize / x.element_size()  # hooks saw float32 tensors; count them at ``dtype``
    in_bytes = int(x.numel() * itemsize)
    return MemoryEstimate(
        params_bytes=int(params),
        buffers_bytes=int(buffers * scale),
        activation_peak_bytes=max(int(state["peak"] * scale), in_bytes),
        activation_total_bytes=int(state["total"] * scale) + in_bytes,
        input_bytes=in_bytes,
    )
