"""Class-subset tasks: what an edge user asks NN-Factory for ("cat, dog, truck").

A task is a set of 2..5 of the data set's classes. Its accuracy is top-1 over the images of those
classes with the logits restricted to them (the model only has to tell the task's classes apart).
:class:`TaskSplit` deals every such subset into *seen* tasks (conditioning of every training step)
and *unseen* ones (held out, about 20%, seeded) to test generation for tasks never trained on.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metamorph.data.sources import CIFAR10_CLASSES
from metamorph.models.metrics import top1

MIN_CLASSES, MAX_CLASSES = 2, 5

Task = tuple[int, ...]  # sorted class indices


def parse_task(
    names: Sequence[str | int] | str | None,
    classes: Sequence[str] = CIFAR10_CLASSES,
    min_classes: int = MIN_CLASSES,
    max_classes: int = MAX_CLASSES,
) -> Task:
    """The sorted class indices of a task given by class names (or indices); a clear error for an
    empty task, an unknown name (with the closest class), a repeated one or a size out of range."""
    if names is None or (isinstance(names, str) and not names.strip()):
        names = []
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    valid = ", ".join(classes)
    if not names:
        raise ValueError(
            f"the task is empty: give {min_classes} to {max_classes} class names, e.g. "
            f"task=[cat,dog,truck] (classes: {valid})"
        )
    out = []
    for n in names:
        if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
            if not 0 <= int(n) < len(classes):
                raise ValueError(f"class index {n} is out of range 0..{len(classes) - 1}")
            out.append(int(n))
            continue
        key = str(n).strip().lower()
        if key not in classes:
            close = difflib.get_close_matches(key, classes, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown class {n!r} in the task{hint}; classes: {valid}")
        out.append(classes.index(key))
    if len(set(out)) != len(out):
        dup = sorted({classes[i] for i in out if out.count(i) > 1})
        raise ValueError(f"class {', '.join(dup)} is named twice in the task")
    if not min_classes <= len(out) <= max_classes:
        raise ValueError(
            f"a task has {min_classes} to {max_classes} classes; got {len(out)} "
            f"({', '.join(classes[i] for i in sorted(out))})"
        )
    return tuple(sorted(out))


def task_names(task: Task, classes: Sequence[str] = CIFAR10_CLASSES) -> list[str]:
    return [classes[i] for i in task]


def multi_hot(task: Task, num_classes: int, device=None) -> torch.Tensor:
    """The task as a ``(num_classes,)`` 0/1 float vector (the assembler's task input)."""
    v = torch.zeros(num_classes, device=device)
    v[list(task)] = 1.0
    return v


def restrict(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """The logits of the task's classes only, in the task's (sorted) order."""
    return logits[:, list(task)]


def task_labels(y: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """``(in_task, local)``: which labels belong to the task, and their index within it."""
    idx = torch.as_tensor(task, device=y.device)
    hit = y.unsqueeze(1) == idx.unsqueeze(0)
    return hit.any(1), hit.float().argmax(1)


def filter_to_task(
    x: torch.Tensor, y: torch.Tensor, task: Task
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of the task's classes, labels remapped to ``0..len(task)-1``."""
    keep, local = task_labels(y, task)
    return x[keep], local[keep]


def task_accuracy(forward, batches: Iterable, task: Task, restricted: bool = False) -> float:
    """Top-1 (%) over the task's images with the logits restricted to the task's classes;
    ``restricted``: ``forward`` already returns only the task's logits (an extracted model)."""

    def task_batches():
        for x, y in batches:
            xt, yt = filter_to_task(x, y, task)
            if len(yt):
                yield xt, yt

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return forward(x) if restricted else restrict(forward(x), task)

    return top1(fwd, task_batches())


@dataclass
class TaskSplit:
    """Every subset of ``2..5`` of ``num_classes`` classes, dealt into seen / unseen (seeded)."""

    num_classes: int = 10
    unseen_fraction: float = 0.2
    seed: int = 0
    min_classes: int = MIN_CLASSES
    max_classes: int = MAX_CLASSES

    def __post_init__(self) -> None:
        if not 0.0 <= self.unseen_fraction < 1.0:
            raise ValueError(f"unseen_fraction={self.unseen_fraction} must be in [0, 1)")
        if not 1 <= self.min_classes <= self.max_classes <= self.num_classes:
            raise ValueError(
                f"task sizes {self.min_classes}..{self.max_classes} do not fit "
                f"{self.num_classes} classes"
            )
        subsets = [
            c
            for k in range(self.min_classes, self.max_classes + 1)
            for c in itertools.combinations(range(self.num_classes), k)
        ]
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(subsets))
        n_unseen = int(round(self.unseen_fraction * len(subsets)))
        self.unseen: list[Task] = sorted(subsets[i] for i in order[:n_unseen])
        self.seen: list[Task] = sorted(subsets[i] for i in order[n_unseen:])
        self._unseen_set = set(self.unseen)

    def is_seen(self, task: Task) -> bool:
        return tuple(task) not in self._unseen_set

    def sample_seen(self, rng: np.random.Generator) -> Task:
        """A seen task, uniformly: the only tasks a training step is ever conditioned on."""
        return self.seen[int(rng.integers(len(self.seen)))]

    def to_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "unseen_fraction": self.unseen_fraction,
            "seed": self.seed,
            "min_classes": self.min_classes,
            "max_classes": self.max_classes,
        }
