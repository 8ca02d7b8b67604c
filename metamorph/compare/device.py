"""The device-profile interface of a comparison, in one adapter over :mod:`metamorph.devices`.

A comparison measures every point's latency on one named profile and records the machine it
ran on; points measured elsewhere are refused. ``profile(name)`` (a shipped profile, checked to
run here), ``machine_fingerprint(profile)``, ``machine_description()`` and
``measure_latency(model, profile)`` (median and IQR in milliseconds) are all it uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from metamorph.devices import (
    DeviceProfile,
    check_available,
    fingerprint,
    get_profile,
    machine_info,
    time_module,
)

Profile = DeviceProfile


@dataclass(frozen=True)
class Latency:
    median_ms: float
    iqr_ms: float
    runs: int


def profile(name: str) -> DeviceProfile:
    """The profile ``name`` (unknown names list the valid ones), checked to run on this machine."""
    p = get_profile(name)
    check_available(p)
    return p


def machine_description() -> dict:
    """CPU model, cores, library versions: what a latency figure depends on besides the model."""
    return machine_info()


def machine_fingerprint(prof: DeviceProfile | None = None) -> str:
    """A short hash of the machine fields that matter for ``prof``'s runtime."""
    return fingerprint(runtime=None if prof is None else prof.runtime)


@torch.no_grad()
def measure_latency(
    model: nn.Module, prof: DeviceProfile, min_run_time: float | None = None
) -> Latency:
    """Forward latency of ``model`` on ``prof``: median and IQR over timed blocks after the
    profile's warm-up (:func:`metamorph.devices.time_module`)."""
    in_ch = getattr(getattr(model, "arch", None), "in_channels", 3)
    x = torch.randn(prof.batch_size, in_ch, prof.resolution, prof.resolution)
    t = time_module(model, x, prof, min_run_time)
    return Latency(t.median_ms, t.iqr_ms, t.blocks)
