"""Device profiles: a named, typed description of where a model runs (runtime, threads, batch,
dtype, input resolution) and how it is timed.

The shipped profiles are the YAML files in ``metamorph/conf/devices/`` (package data; the folder
is ``devices`` rather than ``device`` because a Hydra group called ``device`` would capture the
``device=cpu|cuda|auto`` overrides of the other entry points). :func:`get_profile` also takes a
path to a YAML file of your own. Every profile is validated against :class:`DeviceProfile`, so a
typo in a key or a name fails with the valid ones.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from metamorph.config.locations import CONF_DIR
from metamorph.config.schema import typed

PROFILE_DIR = Path(CONF_DIR) / "devices"

# runtime -> (python module it needs, the pip extra that installs it, what it is)
RUNTIMES: dict[str, tuple[str, str, str]] = {
    "torch_cpu": ("torch", "", "eager PyTorch on the CPU"),
    "onnxruntime": ("onnxruntime", "export", "onnxruntime, CPUExecutionProvider"),
    "openvino": ("openvino", "openvino", "OpenVINO, CPU plugin"),
    "cuda": ("torch", "", "eager PyTorch on a CUDA GPU"),
}
DTYPES = ("float32", "float16")


class ProfileError(ValueError):
    """A profile name, file or field that is wrong (the message names the fix)."""


class DeviceUnavailable(ProfileError):
    """The profile is valid but cannot run on this machine (no CUDA, a runtime not installed)."""


@dataclass
class DeviceProfile:
    name: str = ""
    runtime: str = "torch_cpu"  # torch_cpu | onnxruntime | openvino | cuda
    threads: int | None = 1  # intra-op threads (CPU runtimes); null for cuda
    batch_size: int = 1
    dtype: str = "float32"  # float32 | float16 (cuda only)
    resolution: int = 32  # input images are resolution x resolution
    warmup: int = 10  # untimed calls before timing
    min_run_time: float = 0.5  # seconds of timed calls for a whole model (median / IQR over blocks)
    lut_min_run_time: float = 0.1  # the same for one predictor table entry
    description: str = ""

    def __post_init__(self) -> None:
        where = f"device profile {self.name!r}" if self.name else "device profile"
        if self.runtime not in RUNTIMES:
            raise ProfileError(
                f"{where}: unknown runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}"
            )
        if self.runtime == "cuda":
            if self.threads is not None:
                raise ProfileError(
                    f"{where}: threads={self.threads} has no meaning on runtime cuda; set threads: null"
                )
        elif self.threads is None or int(self.threads) < 1:
            raise ProfileError(f"{where}: runtime {self.runtime} needs threads >= 1")
        if self.dtype not in DTYPES:
            raise ProfileError(f"{where}: unknown dtype {self.dtype!r}; choose one of {DTYPES}")
        if self.dtype == "float16" and self.runtime != "cuda":
            raise ProfileError(f"{where}: dtype float16 is supported on runtime cuda only")
        if int(self.batch_size) < 1:
            raise ProfileError(f"{where}: batch_size={self.batch_size} must be at least 1")
        if int(self.resolution) < 4:
            raise ProfileError(f"{where}: resolution={self.resolution} must be at least 4")
        if int(self.warmup) < 0 or not float(self.min_run_time) > 0:
            raise ProfileError(f"{where}: warmup must be >= 0 and min_run_time > 0")
        if not float(self.lut_min_run_time) > 0:
            raise ProfileError(f"{where}: lut_min_run_time must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 3, self.resolution, self.resolution)

    def timing_key(self) -> dict:
        """The fields that change a measured time (a predictor table is keyed by them)."""
        d = self.to_dict()
        d.pop("description")
        d.pop("min_run_time")
        return d


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _unknown(name: str) -> ProfileError:
    names = list_profiles()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ProfileError(
        f"unknown device profile {name!r}; {hint}valid profiles: {', '.join(names)} "
        "(or a path to a .yaml file with the fields of metamorph.devices.DeviceProfile)"
    )


def get_profile(name: str | DeviceProfile | dict) -> DeviceProfile:
    """A shipped profile by name, a profile YAML file by path, a dict of fields, or a profile."""
    if isinstance(name, DeviceProfile):
        return name
    if isinstance(name, dict):
        return typed(DeviceProfile, dict(name), "device")
    if name is None or str(name).strip() == "":
        raise _unknown("")
    name = str(name)
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ProfileError(f"device profile file {path} not found")
    else:
        path = PROFILE_DIR / f"{name}.yaml"
        if not path.is_file():
            raise _unknown(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"device profile file {path} is not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"device profile file {path} must hold a mapping of fields")
    data.setdefault("name", path.stem)
    known = list(DeviceProfile.__dataclass_fields__)
    unknown = sorted(set(data) - set(known))
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hint = "".join(f" ({k}: did you mean {c[0]!r}?)" for k, c in close.items() if c)
        raise ProfileError(
            f"device profile {path}: unknown key(s) {unknown}{hint}; valid keys: {', '.join(known)}"
        )
    try:
        return typed(DeviceProfile, data, f"device/{path.stem}")
    except ProfileError:
        raise
    except ValueError as e:
        raise ProfileError(" ".join(str(e).split())) from None


def check_available(profile: DeviceProfile) -> None:
    """Raise :class:`DeviceUnavailable` naming what to install (or use) if ``profile`` cannot run
    on this machine."""
    module, extra, what = RUNTIMES[profile.runtime]
    if importlib.util.find_spec(module) is None:
        fix = f"pip install 'metamorph[{extra}]'" if extra else f"pip install {module}"
        raise DeviceUnavailable(
            f"device profile {profile.name!r} runs on {what}, but the {module} package is not "
            f"installed: {fix}"
        )
    if profile.runtime == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device profile {profile.name!r} needs a GPU: no CUDA device is available here "
                "(torch.cuda.is_available() is False; a CPU build of torch or no visible GPU); "
                f"choose a CPU profile ({', '.join(p for p in list_profiles() if p != profile.name)})"
            )
