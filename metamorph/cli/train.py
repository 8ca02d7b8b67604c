"""``metamorph-train``: run the task named by ``task.name`` (``pretrain``, ``metamorph``,
``slimmable``, ``individual``, or any registered one) with a Lightning Trainer configured by Hydra."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from metamorph.cli.entry import entry_point
from metamorph.runtime.summary import report
from metamorph.runtime.tasks import run_task


def run(cfg: DictConfig) -> dict:
    """Run the registered task ``cfg.task.name``; returns its summary (printed last)."""
    torch.set_float32_matmul_precision("high")
    return run_task(cfg)


@entry_point("metamorph-train", "train")
def main(cfg: DictConfig) -> float | None:
    summary = run(cfg)
    report(summary)
    metric = summary.get(cfg.get("optimized_metric") or "val/acc")
    return metric


if __name__ == "__main__":
    main()
