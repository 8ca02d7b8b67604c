"""The device-profile interface the comparison needs, in one adapter.

A comparison measures every point's latency on one named profile and records the machine it
ran on; points measured elsewhere are refused. This module is the only place the comparison
touches device profiles: ``profile(name)``, ``machine_fingerprint()`` and
``measure_latency(model, profile)`` (median and IQR in milliseconds). It covers the eager PyTorch
CPU profiles the comparison configs use until ``metamorph.devices`` provides the full set.
"""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Profile:
    """A measurement setting: runtime, threads and batch size."""

    name: str
    runtime: str  # torch_cpu
    threads: int
    batch_size: int


PROFILES = {
    "cpu1_b1": Profile("cpu1_b1", "torch_cpu", threads=1, batch_size=1),
    "cpu2_b1": Profile("cpu2_b1", "torch_cpu", threads=2, batch_size=1),
    "cpu1_b64": Profile("cpu1_b64", "torch_cpu", threads=1, batch_size=64),
}


@dataclass(frozen=True)
class Latency:
    median_ms: float
    iqr_ms: float
    runs: int


def profile(name: str) -> Profile:
    """The profile ``name``; an unknown name lists the valid ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown device profile {name!r}; valid profiles: {', '.join(sorted(PROFILES))}"
        ) from None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict:
    """What a latency figure depends on besides the model: CPU, cores, library versions."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "system": platform.system(),
        "torch": torch.__version__,
    }


def machine_fingerprint() -> str:
    """A short stable hash of :func:`machine_description` (equal on the same machine setup)."""
    d = machine_description()
    text = "|".join(f"{k}={d[k]}" for k in sorted(d))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@torch.no_grad()
def measure_latency(model: nn.Module, prof: Profile, min_run_time: float = 0.5) -> Latency:
    """Forward latency of ``model`` on ``prof``: median and IQR over timed blocks after a
    warm-up (torch.utils.benchmark, the profile's thread count)."""
    from torch.utils.benchmark import Timer

    if prof.runtime != "torch_cpu":
        raise ValueError(f"profile {prof.name}: runtime {prof.runtime} is not supported here")
    model = model.eval().to("cpu")
    in_ch = getattr(getattr(model, "arch", None), "in_channels", 3)
    x = torch.randn(prof.batch_size, in_ch, 32, 32)
    model(x)
    t = Timer("model(x)", globals={"model": model, "x": x}, num_threads=prof.threads)
    m = t.blocked_autorange(min_run_time=min_run_time)
    return Latency(m.median * 1e3, m.iqr * 1e3, len(m.times))
