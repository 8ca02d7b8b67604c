"""NN-Factory's generative module assembler G: (task, sparsity) -> which modules to switch on.

The paper conditions the assembler on "task and sparsity requirements" and produces the model
without training per scenario; its architecture and losses were not recovered. Here (the
reference notes' small-scale design) G is an MLP from a multi-hot task vector and the sparsity
``s`` to one score per module; the hard mask keeps exactly ``M - round(s * M)`` modules on:

- ``topk``: the highest scores, with a straight-through gradient through ``sigmoid(score / tau)``;
- ``gumbel``: the same on scores perturbed by logistic noise while training (Gumbel-top-k, the
  exact-count form of a Gumbel-sigmoid relaxation); without noise it equals ``topk``.

``use_task`` / ``use_sparsity`` false zero that input (the ablations "G without the task" /
"without the sparsity"); the count of modules on still follows ``s``.
"""

from __future__ import annotations

import torch
from torch import nn

MASK_MODES = ("topk", "gumbel")
MAX_SPARSITY = 0.9


def modules_on(num_modules: int, sparsity: float) -> int:
    """How many modules a mask of ``sparsity`` keeps: ``M - round(s * M)``, at least 1."""
    s = float(sparsity)
    if not 0.0 <= s <= MAX_SPARSITY + 1e-9:
        raise ValueError(f"sparsity {s} is outside [0, {MAX_SPARSITY}]")
    return max(1, num_modules - int(round(s * num_modules)))


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly ``hard`` (so masks hold 0 and 1, no rounding error); backward: the
    gradient goes to ``soft``."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def hard_mask(
    scores: torch.Tensor,
    n_on: int,
    mode: str = "topk",
    tau: float = 1.0,
    noise: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A 0/1 mask with exactly ``n_on`` ones (the highest, perhaps perturbed, scores) whose
    gradient is that of ``sigmoid(scores / tau)`` (straight-through)."""
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; choose one of {MASK_MODES}")
    logits = scores
    if mode == "gumbel" and noise:
        u = torch.rand(scores.shape, generator=generator, device="cpu").to(scores.device)
        u = u.clamp(1e-6, 1 - 1e-6)
        logits = scores + (torch.log(u) - torch.log1p(-u))
    soft = torch.sigmoid(logits / tau)
    idx = torch.topk(logits.detach(), int(n_on)).indices
    hard = torch.zeros_like(soft).scatter(0, idx, 1.0)
    return _StraightThrough.apply(hard.detach(), soft)


class Assembler(nn.Module):
    """MLP ``[multi-hot task, sparsity] -> module scores``."""

    def __init__(
        self,
        num_classes: int,
        num_modules: int,
        hidden: int = 128,
        layers: int = 2,
        use_task: bool = True,
        use_sparsity: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes, self.num_modules = int(num_classes), int(num_modules)
        self.use_task, self.use_sparsity = bool(use_task), bool(use_sparsity)
        dims = [self.num_classes + 1] + [int(hidden)] * int(layers)
        body: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            body += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(dims[-1], self.num_modules)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, 1.0)  # start near "everything on"

    def config(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "num_modules": self.num_modules,
            "hidden": self.head.in_features,
            "layers": sum(isinstance(m, nn.Linear) for m in self.body),
            "use_task": self.use_task,
            "use_sparsity": self.use_sparsity,
        }

    def forward(self, task_vec: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Scores ``(num_modules,)`` for one task vector ``(num_classes,)`` and sparsity."""
        t = task_vec if self.use_task else torch.zeros_like(task_vec)
        s = torch.full((1,), float(sparsity) if self.use_sparsity else 0.0, device=t.device)
        return self.head(self.body(torch.cat([t, s])))

    def mask(
        self,
        task_vec: torch.Tensor,
        sparsity: float,
        mode: str = "topk",
        tau: float = 1.0,
        noise: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The hard mask of (task, sparsity): exactly :func:`modules_on` modules on."""
        n_on = modules_on(self.num_modules, sparsity)
        return hard_mask(self(task_vec, sparsity), n_on, mode, tau, noise, generator)
