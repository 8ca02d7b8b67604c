"""``torch.compile`` of the INR trunk (``task.compile``): the part of a metamorphic training step
that runs the same small MLP over tens of thousands of queries.

The trunk is compiled as a pure function of tensors (the pre-activation and the head's weights),
not of a head module, so one graph serves every head (dynamo guards on shapes, not on module
identity), and with ``dynamic=true`` one graph serves every sampled width as well (the query
count is symbolic): the number of compilations stays bounded whatever the shapes a run samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass
class CompileConfig:
    """``task.compile``: what of the training step is compiled, and how.

    ``mode``: torch.compile's mode; ``reduce-overhead`` adds CUDA graphs and needs a GPU.
    ``backend``: ``inductor`` (generated kernels), ``aot_eager`` / ``eager`` (graph capture
    only: for debugging, and what the fast tests use). ``dynamic``: symbolic query counts, so
    the sampled widths share one graph (false: one graph per distinct shape, at most
    ``cache_size_limit`` of them, after which dynamo runs the rest eagerly).
    """

    enabled: bool = False
    mode: str = "default"
    backend: str = "inductor"
    dynamic: bool = True
    cache_size_limit: int = 64

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"task.compile.mode={self.mode!r}; choose one of {list(MODES)}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"task.compile.backend={self.backend!r}; choose one of {list(BACKENDS)}"
            )
        if self.mode != "default" and self.backend != "inductor":
            raise ValueError(
                f"task.compile.mode={self.mode!r} is an inductor mode; it cannot combine with "
                f"task.compile.backend={self.backend!r} (use backend=inductor or mode=default)"
            )
        if int(self.cache_size_limit) < 1:
            raise ValueError(
                f"task.compile.cache_size_limit={self.cache_size_limit}; it must be >= 1"
            )

    def check_device(self, device: torch.device) -> None:
        """Fail clearly where the chosen mode cannot run (never fall back silently)."""
        if self.enabled and self.mode == "reduce-overhead" and device.type != "cuda":
            raise ValueError(
                "task.compile.mode=reduce-overhead records CUDA graphs and needs a CUDA device "
                f"(this run trains on {device.type}); use task.compile.mode=default on a CPU"
            )


def trunk_fn(
    pre: torch.Tensor,
    ws: list[torch.Tensor],
    bs: list[torch.Tensor],
    scales: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
) -> torch.Tensor:
    """:meth:`ResMLPHead.trunk` as a function of tensors (the same operations)."""
    h = torch.relu(pre)
    for k in range(len(ws)):
        h = h + scales[k] * torch.relu(F.linear(h, ws[k], bs[k]))
    return F.linear(h, w_out, b_out)


def stacked_trunk_fn(
    h: torch.Tensor,
    ws: list[torch.Tensor],
    bs: list[torch.Tensor],
    scales: list[torch.Tensor],
    w_out: torch.Tensor,
    b_out: torch.Tensor,
) -> torch.Tensor:
    """The trunk of G heads at once: ``h`` (G, Q, hidden), stacked weights (G, in, out)."""
    h = torch.relu(h)
    for w, b, s in zip(ws, bs, scales):
        h = h + s * torch.relu(torch.baddbmm(b, h, w))
    return torch.baddbmm(b_out, h, w_out)


def compile_fns(cfg: CompileConfig):
    """The compiled (trunk, stacked trunk) pair, with dynamo's recompilation bound set."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(
        int(torch._dynamo.config.cache_size_limit), int(cfg.cache_size_limit)
    )
    kw = {"backend": cfg.backend, "dynamic": bool(cfg.dynamic)}
    if cfg.backend == "inductor":
        kw["mode"] = cfg.mode
    return torch.compile(trunk_fn, **kw), torch.compile(stacked_trunk_fn, **kw)
