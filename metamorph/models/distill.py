"""Knowledge-distillation losses (temperature ``t``), shared by every task that distils."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor, t: float) -> torch.Tensor:
    """``-sum p_teacher log p_student`` (temperature ``t``, scaled by ``t^2``), batch mean.
    The teacher's probabilities are passed in, so several students share one softmax."""
    return -(target_probs * F.log_softmax(logits / t, dim=1)).sum(1).mean() * (t * t)


def kl_distillation(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """``KL(p_teacher || p_student)`` of logits at temperature ``t``, batch mean, *not* scaled by
    ``t^2`` (callers that sum several students scale once). Equals :func:`soft_cross_entropy`
    minus the teacher's entropy: the same gradient for the student."""
    return F.kl_div(
        F.log_softmax(student / t, 1),
        F.log_softmax(teacher / t, 1),
        reduction="batchmean",
        log_target=True,
    )
