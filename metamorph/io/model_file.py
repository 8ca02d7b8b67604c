"""The project's model format: ``<name>.safetensors`` (weights) + ``<name>.json`` (architecture).

Loading never unpickles anything: the JSON names a registered model family and its architecture,
the safetensors file holds the tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from metamorph.io.atomic import atomic_write, atomic_write_text
from metamorph.models.registry import build_from_arch, family_of

FORMAT = "metamorph.model/v1"


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``model`` as safetensors + JSON; returns the JSON path. Both writes are atomic."""
    st_path, json_path = _paths(path)
    family = family_of(model)
    doc = {
        "format": FORMAT,
        "family": family.name,
        "arch": family.arch_of(model),
        "meta": meta or {},
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(st_path, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    atomic_write_text(json_path, json.dumps(doc, indent=2))
    return json_path


def read_model_json(path: str | os.PathLike) -> dict:
    _, json_path = _paths(path)
    if not json_path.exists():
        raise FileNotFoundError(f"model architecture file {json_path} not found")
    try:
        doc = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON ({e}); the file is corrupt") from e
    if doc.get("format") != FORMAT:
        raise ValueError(
            f"{json_path} is not a metamorph model file (format {doc.get('format')!r}, "
            f"expected {FORMAT!r}); convert foreign checkpoints with metamorph-convert"
        )
    return doc


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and return the standalone model stored at ``path`` (either file or the prefix)."""
    st_path, _ = _paths(path)
    doc = read_model_json(path)
    model = build_from_arch(doc["family"], doc["arch"])
    if not st_path.exists():
        raise FileNotFoundError(f"weights file {st_path} not found next to its JSON")
    try:
        state = load_file(str(st_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{st_path} is truncated or corrupt ({e}); re-export the model") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{st_path} does not match its architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.eval()
    model.meta = doc.get("meta", {})
    return model
