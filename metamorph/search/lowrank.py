"""GeneCAI's decomposition phase on top of :mod:`metamorph.models.lowrank` (the Tucker-2 layers
and the ``cifar_resnet_lowrank`` model family live at the models layer): saving and loading the
searched networks."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from metamorph.io.model_file import load_model, save_model
from metamorph.models.lowrank import (
    LOWRANK_FAMILY,
    RankPair,
    Tucker2Conv,
    TuckerCache,
    build_lowrank,
    decompose_conv,
    lowrank_arch,
    lowrank_layers,
    rank_levels,
    tucker2_factors,
)
from metamorph.models.segments import set_submodule

__all__ = [
    "LOWRANK_FAMILY",
    "RankPair",
    "Tucker2Conv",
    "TuckerCache",
    "build_lowrank",
    "decompose_conv",
    "load_compressed",
    "lowrank_arch",
    "lowrank_layers",
    "rank_levels",
    "save_compressed",
    "set_submodule",
    "tucker2_factors",
]


def save_compressed(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save a searched network in the project's model format; returns the JSON path: a plain
    ``cifar_resnet`` without low-rank layers, else ``cifar_resnet_lowrank`` (the model-family
    registry picks it; ``metamorph.load`` reads both)."""
    return save_model(model, path, meta=meta)


def load_compressed(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Load a model written by :func:`save_compressed` (plain or low-rank)."""
    return load_model(path, map_location=map_location)
