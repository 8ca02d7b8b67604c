"""What every point source shares: the data, the device profile and one way to measure.

Every candidate network is measured here and nowhere else: top-1 accuracy on the whole split,
parameters, FLOPs of one 32x32 image, latency median and IQR on the profile. That is the one
evaluation protocol of a comparison (:func:`~metamorph.compare.points.protocol_id`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from metamorph.compare import device as devices
from metamorph.compare.points import MissingPoints, Point, Setting, descriptor_json, protocol_id
from metamorph.compare.registry import Candidate
from metamorph.models.metrics import top1
from metamorph.utils.profile import count_flops, count_params


class Context:
    """Lazily built data module and test batches (per normalisation), the profile and machine."""

    def __init__(
        self,
        dm,
        data_name: str,
        split: str,
        profile: devices.Profile,
        device: torch.device,
        seed: int = 0,
        min_run_time: float | None = None,
        log=print,
    ) -> None:
        self.dm = dm
        self.data_name = data_name
        self.split = split
        self.profile = profile
        self.device = device
        self.seed = seed
        self.min_run_time = min_run_time
        self.log = log
        self.machine = devices.machine_fingerprint(profile)
        self._batches: dict[tuple, list] = {}
        self._setting: Setting | None = None

    def setup(self) -> None:
        self.dm.setup()
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split={self.split!r} must be train, val or test")

    @property
    def images(self) -> int:
        self.setup()
        return len(self.dm.split_tensors(self.split)[1])

    @property
    def setting(self) -> Setting:
        if self._setting is None:
            n = self.images
            self._setting = Setting(
                self.data_name,
                self.split,
                n,
                self.profile.name,
                self.machine,
                protocol_id(self.split, n),
            )
        return self._setting

    def batches(self, mean, std) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The whole split, normalised as a model with ``mean`` / ``std`` expects, on the
        evaluation device (cached per normalisation)."""
        key = (tuple(mean), tuple(std))
        if key not in self._batches:
            self.setup()
            self.dm.set_normalization(mean, std)
            self._batches[key] = list(self.dm.normalized_batches(self.split, device=self.device))
        return self._batches[key]

    @staticmethod
    def require(path: str | Path | None, what: str, remake: str = "") -> Path:
        """``path`` if it exists; otherwise :class:`MissingPoints` saying how to make it."""
        if not path:
            raise MissingPoints(f"no {what} configured")
        p = Path(path)
        if not p.exists():
            how = f"; make it with: {remake}" if remake else ""
            raise MissingPoints(f"{what} {p} not found{how}")
        return p

    def load_checkpoint(self, path: str | Path | None, kind: str, what: str, remake: str = ""):
        """The object of a ``kind`` checkpoint (through the checkpoint registry); a missing file
        is :class:`MissingPoints`, a checkpoint of another kind a clear error."""
        from metamorph.runtime.checkpoints import checkpoint_kind, load_checkpoint

        p = self.require(path, what, remake)
        found = checkpoint_kind(p)
        if found != kind:
            raise ValueError(f"{p} is a {found} checkpoint, not a {what} ({kind}) one")
        return p, load_checkpoint(p)

    @torch.no_grad()
    def measure(self, method: str, cand: Candidate) -> Point:
        model = cand.model.eval()
        if self.profile.batch_size < 1:
            raise ValueError("a profile's batch size must be at least 1")
        arch = model.arch
        acc = top1(model.to(self.device), self.batches(arch.mean, arch.std))
        model = model.cpu()
        lat = devices.measure_latency(model, self.profile, self.min_run_time)
        s = self.setting
        return Point(
            method=method,
            series=cand.series,
            descriptor=descriptor_json(cand.descriptor),
            seen=cand.seen,
            acc=round(acc, 3),
            params=count_params(model),
            flops=count_flops(model),
            latency_ms=round(lat.median_ms, 4),
            latency_iqr_ms=round(lat.iqr_ms, 4),
            data=s.data,
            split=s.split,
            images=s.images,
            profile=s.profile,
            machine=s.machine,
            protocol=s.protocol,
            artefact=cand.artefact,
            make_s=None if cand.make_s is None else round(cand.make_s, 4),
        )
