"""The machine a figure was measured on, and a fingerprint so that figures (and predictor tables)
from different machines or library versions are never mixed silently."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform

# libraries whose version changes a runtime's speed
_RUNTIME_LIBS = {
    "torch_cpu": ("torch",),
    "cuda": ("torch",),
    "onnxruntime": ("torch", "onnxruntime", "onnx"),
    "openvino": ("torch", "openvino", "onnx"),
}
_ALL_LIBS = ("torch", "onnxruntime", "onnx", "openvino")


class MachineMismatch(ValueError):
    """Two figures were measured on different machines (or library versions)."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(lib: str) -> str | None:
    try:
        return importlib.metadata.version(lib)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_device() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"


def machine_info() -> dict:
    """CPU model, cores (all and usable by this process), OS, Python and library versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
    }
    for lib in _ALL_LIBS:
        info[lib] = _version(lib)
    info["cuda_device"] = _cuda_device()
    return info


def relevant(info: dict, runtime: str | None = None) -> dict:
    """The part of :func:`machine_info` that a runtime's timings depend on."""
    keys = ["cpu", "cores", "usable_cores", "system"]
    keys += list(_RUNTIME_LIBS.get(runtime, _ALL_LIBS))
    if runtime in (None, "cuda"):
        keys.append("cuda_device")
    return {k: info.get(k) for k in keys}


def fingerprint(info: dict | None = None, runtime: str | None = None) -> str:
    """A short hash of the machine fields that matter for ``runtime``."""
    info = machine_info() if info is None else info
    text = json.dumps(relevant(info, runtime), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_machine(a: dict, b: dict, runtime: str | None = None, allow: bool = False) -> list:
    """The fields in which machines ``a`` and ``b`` differ; raises :class:`MachineMismatch`
    unless ``allow`` (then the differences are only returned)."""
    ra, rb = relevant(a, runtime), relevant(b, runtime)
    diff = [f"{k}: {ra[k]!r} vs {rb[k]!r}" for k in ra if ra[k] != rb.get(k)]
    if diff and not allow:
        raise MachineMismatch(
            "the figures were measured on different machines (" + "; ".join(diff) + "); "
            "compare them only with allow_different_machines=True"
        )
    return diff
