"""The teacher's activations at every block boundary, cached once (float16 ``.npy`` under the run
folder) for the mimic training of alternatives and the search's incremental evaluation.

Boundary ``i`` is the input of teacher block ``i`` (``i = len(blocks)``: the last block's
output). Each boundary is one file, written atomically and read memory-mapped, so training an
alternative of segment ``[a, b)`` loads only boundaries ``a`` and ``b`` (peak memory stays low)
and a killed run keeps the files it finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from metamorph.io.atomic import atomic_path, atomic_write_text
from metamorph.models.resnet_cifar import CifarResNet


class FeatureCache:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, boundary: int) -> Path:
        return self.folder / f"boundary{boundary:03d}.npy"

    @property
    def complete(self) -> bool:
        return (self.folder / "features.json").is_file()

    def info(self) -> dict:
        return json.loads((self.folder / "features.json").read_text())

    @torch.no_grad()
    def fill(
        self, teacher: CifarResNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250
    ) -> None:
        """Run ``teacher`` on normalized images ``x`` once and write every boundary + labels."""
        if self.complete and self.info().get("images") == len(y):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        teacher = teacher.eval()
        blocks = teacher.blocks()
        outs: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
        logits = []
        for i in range(0, len(y), batch_size):
            h = teacher(x[i : i + batch_size], stop=0)
            outs[0].append(h.half())
            for k, blk in enumerate(blocks):
                h = blk(h)
                outs[k + 1].append(h.half())
            logits.append(teacher(h, start=len(blocks)))
        for k, parts in enumerate(outs):
            arr = torch.cat(parts).numpy()
            with atomic_path(self.path(k)) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, arr)
        with atomic_path(self.folder / "labels.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, y.numpy())
        teacher_acc = (torch.cat(logits).argmax(1) == y).float().mean().item() * 100
        atomic_write_text(
            self.folder / "features.json",
            json.dumps({"images": len(y), "boundaries": len(outs), "teacher_acc": teacher_acc}),
        )

    def boundary(self, i: int) -> np.ndarray:
        """Boundary ``i`` (memory-mapped float16, ``(N, C, H, W)``)."""
        if not self.complete:
            raise FileNotFoundError(f"the feature cache {self.folder} is incomplete")
        return np.load(self.path(i), mmap_mode="r")

    def tensor(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.boundary(i), dtype=np.float32))

    def labels(self) -> torch.Tensor:
        return torch.from_numpy(np.load(self.folder / "labels.npy"))
