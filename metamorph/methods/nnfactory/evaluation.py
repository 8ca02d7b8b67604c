"""Test-split accuracy of task models, and the table of NN-Factory against its baselines.

The protocol of every accuracy here: the test split's images of the task's classes (all of
them: 1,000 per CIFAR-10 class), top-1 with the logits restricted to the task, eval-mode BN, no
test-time augmentation. A network that serves every task (a task-agnostic mask, the pruned full
network) is run once over the whole test split and scored per task from the same logits, which is
exactly what its classifier cut to the task would give.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from metamorph.methods.nnfactory.class_tasks import Task, filter_to_task, restrict


@dataclass
class TestSplit:
    """The normalised test split, transformed once (a customization sweep reuses it)."""

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int = 500

    @classmethod
    def from_datamodule(cls, dm, batch_size: int = 500) -> TestSplit:
        x, y = dm.split_tensors("test")
        xs = [dm.transform_batch(x[i : i + 2000]) for i in range(0, len(y), 2000)]
        return cls(torch.cat(xs), y, batch_size)

    @torch.no_grad()
    def task_accuracy(self, model: torch.nn.Module, task: Task) -> tuple[float, int]:
        """``(top-1 %, images)`` of a task model (its logits are the task's classes, in the
        task's order) over the test images of the task's classes."""
        xt, yt = filter_to_task(self.x, self.y, task)
        model = model.eval()
        correct = 0
        for i in range(0, len(yt), self.batch_size):
            correct += (
                (model(xt[i : i + self.batch_size]).argmax(1) == yt[i : i + self.batch_size])
                .sum()
                .item()
            )
        return 100.0 * correct / max(1, len(yt)), int(len(yt))

    @torch.no_grad()
    def all_logits(self, model: torch.nn.Module) -> torch.Tensor:
        model = model.eval()
        return torch.cat(
            [model(self.x[i : i + self.batch_size]) for i in range(0, len(self.y), self.batch_size)]
        )

    def per_task(
        self, logits: torch.Tensor, tasks: Iterable[Task]
    ) -> dict[Task, tuple[float, int]]:
        """Task accuracies of one network from its logits over the whole test split."""
        out = {}
        for task in tasks:
            lt, yt = filter_to_task(logits, self.y, task)
            hit = (restrict(lt, task).argmax(1) == yt).sum().item()
            out[tuple(task)] = (100.0 * hit / max(1, len(yt)), int(len(yt)))
        return out


def _mean(v: Sequence[float]) -> float | None:
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return round(sum(v) / len(v), 2) if v else None


def summarize(rows: list[dict]) -> list[dict]:
    """Per (method, budget): mean test accuracy over seen / unseen tasks, the gap, violations
    (measured latency over the budget, or no model within it) and the mean wall time."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["budget_frac"])].append(r)
    out = []
    for (method, frac), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        seen = [r["acc"] for r in rs if r["seen"] and r.get("acc") is not None]
        unseen = [r["acc"] for r in rs if not r["seen"] and r.get("acc") is not None]
        ms, mu = _mean(seen), _mean(unseen)
        out.append(
            {
                "method": method,
                "budget_frac": frac,
                "budget_ms": rs[0]["budget_ms"],
                "tasks": len(rs),
                "seen_acc": ms,
                "unseen_acc": mu,
                "gap": None if ms is None or mu is None else round(ms - mu, 2),
                "measured_ms": _mean([r.get("measured_ms") for r in rs]),
                "violations": sum(1 for r in rs if r.get("violation")),
                "no_fit": sum(1 for r in rs if r.get("acc") is None),
                "wall_s": _mean([r.get("wall_s") for r in rs]),
            }
        )
    return out


def markdown(summary: list[dict]) -> str:
    cols = [
        ("method", "method"),
        ("budget_frac", "budget (x full)"),
        ("budget_ms", "budget ms"),
        ("tasks", "tasks"),
        ("seen_acc", "seen acc %"),
        ("unseen_acc", "unseen acc %"),
        ("gap", "seen - unseen"),
        ("measured_ms", "measured ms (mean)"),
        ("violations", "violations"),
        ("no_fit", "no model fits"),
        ("wall_s", "wall s (mean)"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        lines.append("| " + " | ".join("" if r[k] is None else str(r[k]) for k, _ in cols) + " |")
    return "\n".join(lines)
