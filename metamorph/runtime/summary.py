"""The run summary every entry point prints: readable lines, then one JSON line last on stdout."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


def report(summary: dict) -> None:
    """Print a run summary: one readable line per figure, then the one-line JSON."""
    for k, v in summary.items():
        print(f"  {k:>14}: {v}")
    print_summary(summary)


def plain(cfg: DictConfig) -> dict:
    """A resolved config as plain containers (for hyper-parameters and JSON)."""
    return OmegaConf.to_container(cfg, resolve=True)


def _clean(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def print_summary(summary: dict) -> None:
    """The last line of stdout of every entry point: a one-line JSON summary."""
    print(json.dumps(_clean(summary), sort_keys=True), flush=True)
