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


def pair_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(<prefix>.safetensors, <prefix>.json)`` of a pair named by either file or the prefix."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``model`` as safetensors + JSON; returns the JSON path. Both writes are atomic."""
    family = family_of(model)
    doc = {
        "format": FORMAT,
        "family": family.name,
        "arch": family.arch_of(model),
        "meta": meta or {},
    }
    return write_pair(path, model.state_dict(), doc)


def write_pair(path: str | os.PathLike, tensors: dict[str, torch.Tensor], doc: dict) -> Path:
    """Write ``tensors`` as ``<path>.safetensors`` and ``doc`` (which names its ``format``) as
    ``<path>.json``, each atomically; returns the JSON path. The one writer of every
    safetensors + JSON pair (model files, NN-Factory's factory)."""
    st_path, json_path = pair_paths(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fmt = str(doc["format"])
    atomic_write(st_path, lambda p: save_file(tensors, str(p), metadata={"format": fmt}))
    atomic_write_text(json_path, json.dumps(doc, indent=2))
    return json_path


def read_pair_json(path: str | os.PathLike, fmt: str, missing: str, what: str, fix: str) -> dict:
    """The JSON half of a pair, checked: a clear error when it is missing (``missing``, with
    ``{path}``), corrupt, or of another format than ``fmt`` ("<file> is not <what> (format ...,
    expected ...); <fix>")."""
    _, json_path = pair_paths(path)
    if not json_path.exists():
        raise FileNotFoundError(missing.format(path=json_path))
    try:
        doc = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON ({e}); the file is corrupt") from e
    got = doc.get("format") if isinstance(doc, dict) else None
    if got != fmt:
        raise ValueError(f"{json_path} is not {what} (format {got!r}, expected {fmt!r}); {fix}")
    return doc


def read_pair_tensors(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", hint: str = ""
) -> dict[str, torch.Tensor]:
    """The safetensors half of a pair (never unpickles); a clear error when it is missing,
    truncated or corrupt (``hint``: what to do then)."""
    st_path, _ = pair_paths(path)
    if not st_path.exists():
        raise FileNotFoundError(f"weights file {st_path} not found next to its JSON")
    try:
        return load_file(str(st_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{st_path} is truncated or corrupt ({e}){hint}") from e


def read_model_json(path: str | os.PathLike) -> dict:
    return read_pair_json(
        path,
        FORMAT,
        missing="model architecture file {path} not found",
        what="a metamorph model file",
        fix="convert foreign checkpoints with metamorph-convert",
    )


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and return the standalone model stored at ``path`` (either file or the prefix)."""
    st_path, _ = pair_paths(path)
    doc = read_model_json(path)
    model = build_from_arch(doc["family"], doc["arch"])
    state = read_pair_tensors(path, map_location, hint="; re-export the model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{st_path} does not match its architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.eval()
    model.meta = doc.get("meta", {})
    return model
