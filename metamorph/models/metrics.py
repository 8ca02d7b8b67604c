"""Top-1 accuracy of any ``x -> logits`` over batches: the one evaluation loop of metamorph."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch


def tensor_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` cut into consecutive batches of ``batch_size``."""
    for i in range(0, len(y), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


@torch.no_grad()
def count_correct(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str | None = None,
) -> tuple[int, int]:
    """``(correct, total)`` top-1 predictions of ``forward`` over ``(x, y)`` batches, each moved
    to ``device`` first when given."""
    correct = total = 0
    for x, y in batches:
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        correct += (forward(x).argmax(1) == y).sum().item()
        total += y.numel()
    return correct, total


def top1(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy in percent (0 for no images)."""
    correct, total = count_correct(forward, batches, device)
    return 100.0 * correct / max(1, total)
