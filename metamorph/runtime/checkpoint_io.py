"""A Lightning CheckpointIO whose writes are atomic and whose reads never unpickle code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from metamorph.io.akamaster import load_untrusted_checkpoint
from metamorph.io.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    A process killed mid-write leaves the previous checkpoint intact. Loading uses
    ``weights_only=True``: checkpoints hold tensors and plain containers only.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} not found; check ckpt_path")
        try:
            return load_untrusted_checkpoint(path, map_location or "cpu")
        except ValueError as e:
            raise ValueError(
                f"checkpoint {path} could not be loaded safely (corrupt or foreign?): {e}"
            ) from e

    def remove_checkpoint(self, path) -> None:
        if os.path.exists(path):
            os.remove(path)
