"""One registry of checkpoint kinds: which loader reads a file, decided from the file itself.

A kind is registered where it is defined, with the loader ``(path, map_location) -> object``
(``@register_checkpoint_kind("metamorph", sniff=...)`` in :mod:`metamorph.tasks.metamorph_train`).
New Lightning checkpoints carry their kind in a top-level ``kind`` field (written by each
LightningModule's ``on_save_checkpoint``); older files are recognised by the kinds' ``sniff``
functions on the loaded dict. Model files (safetensors + JSON) and the foreign akamaster
checkpoints are kinds too (``model_file``, ``akamaster``), registered here because their code
lives in the lower :mod:`metamorph.io` layer. Everything is read with
``torch.load(weights_only=True)``: loading never executes pickled code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metamorph.io.akamaster import load_untrusted_checkpoint
from metamorph.runtime.registry import Registry

KIND_KEY = "kind"
MODEL_FILE_SUFFIXES = (".json", ".safetensors")

Loader = Callable[[Path, str], Any]
Sniffer = Callable[[dict], bool]


@dataclass(frozen=True)
class CheckpointKind:
    name: str
    loader: Loader
    sniff: Sniffer | None = None


CHECKPOINT_KINDS: Registry[CheckpointKind] = Registry(
    "checkpoint kind",
    hint="a new kind registers itself with @metamorph.runtime.checkpoints."
    "register_checkpoint_kind('<name>') (see docs/DESIGN.md)",
)


def register_checkpoint_kind(
    kind: str, *, sniff: Sniffer | None = None
) -> Callable[[Loader], Loader]:
    """Decorator on a loader ``(path, map_location) -> object``: register it as kind ``kind``.

    ``sniff(checkpoint_dict) -> bool`` recognises files written before checkpoints carried a
    ``kind`` field; kinds that always write the field need none."""

    def wrap(loader: Loader) -> Loader:
        CHECKPOINT_KINDS.register(kind, CheckpointKind(kind, loader, sniff))
        return loader

    return wrap


def list_checkpoint_kinds() -> list[str]:
    return CHECKPOINT_KINDS.names()


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

_once: dict | None = None  # while load_checkpoint runs: the file it reads, read only once


def _stat_key(path: Path, map_location) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size, str(map_location))


def submodule_state(ckpt: dict, prefix: str) -> dict:
    """The entries of a Lightning checkpoint's ``state_dict`` under ``prefix`` (e.g. ``"net."``:
    the attribute the LightningModule holds the network in), with the prefix removed."""
    return {
        k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)
    }


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors: missing file, a directory,
    objects outside the weights-only allow-list, truncated or corrupt data."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} not found")
    if p.is_dir():
        raise ValueError(f"{p} is a directory, not a checkpoint file")
    key = _stat_key(p, map_location)
    if _once is not None and key in _once:
        return _once[key]
    obj = load_untrusted_checkpoint(p, map_location)
    if _once is not None:
        _once[key] = obj
    return obj


def is_model_file(path: str | os.PathLike) -> bool:
    """A metamorph model file (a JSON document or a safetensors file) rather than a checkpoint.

    By suffix, or by content for renamed files: checkpoints are zip archives or pickles; a file
    counts as a model file only if it parses as JSON or carries a consistent safetensors header
    (8-byte little-endian length that fits the file, then a JSON object), so random bytes are
    not mistaken for one. A path prefix whose ``.json`` exists counts too."""
    p = Path(path)
    if not p.exists():
        return p.suffix not in MODEL_FILE_SUFFIXES and Path(str(p) + ".json").exists()
    if p.suffix in MODEL_FILE_SUFFIXES:
        return True
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(16)
            if head.lstrip().startswith(b"{") and size <= 16 << 20:
                fh.seek(0)
                try:
                    json.loads(fh.read())
                    return True
                except ValueError:
                    return False
    except OSError:
        return False
    if len(head) < 10 or head[8:10] != b'{"':
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8


def kind_of(obj: Any) -> str | None:
    """The kind of a loaded checkpoint dict: its ``kind`` field, else the first sniff that
    recognises it; ``None`` for none."""
    if not isinstance(obj, dict):
        return None
    kind = obj.get(KIND_KEY)
    if isinstance(kind, str) and kind in CHECKPOINT_KINDS:
        return kind
    for name, k in CHECKPOINT_KINDS.items():
        if k.sniff is not None and k.sniff(obj):
            return name
    return None


def checkpoint_kind(path: str | os.PathLike) -> str:
    """The registered kind of the file at ``path``; a clear error listing the known kinds for
    a file of none."""
    p = Path(path)
    if is_model_file(p):
        return "model_file"
    obj = read_checkpoint(p)
    kind = kind_of(obj)
    if kind is None:
        raise ValueError(
            f"{p} is a checkpoint of no known kind; known kinds: "
            f"{', '.join(list_checkpoint_kinds())}"
        )
    return kind


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """The object a file holds, rebuilt by its kind's loader (a ``MetamorphModule``, a
    ``SlimmableModule``, a plain network...); the file is read once."""
    global _once
    p, outer = Path(path), _once
    _once = {} if outer is None else outer
    try:
        kind = checkpoint_kind(p)
        return CHECKPOINT_KINDS.get(kind).loader(p, map_location)
    finally:
        _once = outer


def load_task_checkpoint(path, task: str, label: str, map_location="cpu") -> tuple[dict, dict]:
    """A Lightning checkpoint of ``task=<task>`` loaded with ``weights_only=True``.

    Returns ``(checkpoint, hyper_parameters)``; raises a clear error for a missing, corrupt or
    truncated file, or for a checkpoint of another kind (no ``task`` entry in its
    hyper-parameters). ``label`` names the kind in messages ("metamorphic", "slimmable").
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{label} checkpoint {path} not found")
    ckpt = read_checkpoint(path, map_location)
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if task not in hp or "base_arch" not in hp:
        raise ValueError(
            f"{path} is not a {label} checkpoint (trained with task={task}); got a different kind"
        )
    return ckpt, hp


def lightning_task(obj: dict) -> str | None:
    """``task.name`` of the run config stored in a Lightning checkpoint's hyper-parameters."""
    hp = obj.get("hyper_parameters") or {}
    task = (hp.get("config") or {}).get("task") or {} if isinstance(hp, dict) else {}
    name = task.get("name") if isinstance(task, dict) else None
    return str(name) if name else None


# ----------------------------------------------------------------------------------------------
# Kinds defined in the io layer
# ----------------------------------------------------------------------------------------------


@register_checkpoint_kind("model_file")
def _load_model_file(path: Path, map_location: str = "cpu"):
    from metamorph.io.model_file import load_model

    return load_model(path, map_location=map_location)


def _is_akamaster(obj: dict) -> bool:
    return (
        "state_dict" in obj
        and "hyper_parameters" not in obj
        and "pytorch-lightning_version" not in obj
    )


@register_checkpoint_kind("akamaster", sniff=_is_akamaster)
def _load_akamaster(path: Path, map_location: str = "cpu"):
    """A foreign akamaster CIFAR ResNet checkpoint as a :class:`CifarResNet` (eval mode)."""
    from metamorph.io.akamaster import akamaster_to_metamorph

    model, _ = akamaster_to_metamorph(read_checkpoint(path))
    return model.to(map_location)
