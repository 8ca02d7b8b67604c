"""A latency predictor per device profile: a look-up table of measured per-block latencies.

A network is decomposed into pieces keyed by their shapes (for the CIFAR ResNets: one entry per
BasicBlock configuration: in-width, hidden width, out-width, stride, input resolution, shortcut,
BN and variant; plus one stem+head piece). Each piece is measured once in isolation on the
profile, and the prediction is **exactly** the sum of the network's block entries plus its fixed
overhead, the measured stem+head piece (which also carries the runtime's per-call cost). Runtimes
that run a whole graph per call (onnxruntime, OpenVINO) pay their call cost once per model, not
once per block, so their block entries are stored net of it (the time of an empty graph).

Tables are cached under ``$METAMORPH_CACHE/devices`` (default ``~/.cache/metamorph/devices``),
one file per profile and machine fingerprint (:mod:`metamorph.devices.machine`) plus the
profile's timing fields; missing entries are measured when first needed and the file is
rewritten atomically; a file whose stored fingerprint does not match is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metamorph.devices.machine import fingerprint, machine_info
from metamorph.devices.measure import Timing, time_module
from metamorph.devices.profiles import DeviceProfile, check_available, get_profile

FORMAT = 1
# runtimes that execute a whole graph per call: their per-call cost is paid once per model
SESSION_RUNTIMES = ("onnxruntime", "openvino")
CALL_KEY = "call"


def default_cache_dir() -> Path:
    """``$METAMORPH_CACHE/devices`` if the variable is set, else ``~/.cache/metamorph/devices``
    (the data cache's convention)."""
    base = os.environ.get("METAMORPH_CACHE")
    if base:
        return Path(base).expanduser() / "devices"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "metamorph" / "devices"


# ----------------------------------------------------------------------------------------------
# Decomposing a network into measurable pieces
# ----------------------------------------------------------------------------------------------


@dataclass
class Piece:
    """One table entry: its key and how to build it (module, example inputs) for measuring."""

    key: str
    build: Callable[[DeviceProfile], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    overhead: bool = False  # the fixed part (stem + head), not a block


class _StemHead(nn.Module):
    """The stem (conv, BN, ReLU) and the head (global pool, classifier) of a CIFAR ResNet in one
    call: the part of every network that is not a BasicBlock."""

    def __init__(self, in_ch: int, w0: int, bn: bool, w_last: int, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, w0, 3, 1, 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(w0) if bn else nn.Identity()
        self.fc = nn.Linear(w_last, classes)

    def forward(self, x: torch.Tensor, feat: torch.Tensor):
        return F.relu(self.bn1(self.conv1(x))), self.fc(F.adaptive_avg_pool2d(feat, 1).flatten(1))


class _Empty(nn.Module):
    """A graph with one tiny op: what a session call costs with (almost) no work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, :1, :1] + 1.0


def _rand(p: DeviceProfile, *shape: int) -> torch.Tensor:
    return torch.randn(p.batch_size, *shape, generator=torch.Generator().manual_seed(0))


def _cifar_resnet_pieces(arch) -> list[Piece]:
    from metamorph.models.resnet_cifar import BasicBlock, ResNetArch

    a = arch if isinstance(arch, ResNetArch) else ResNetArch.from_dict(dict(arch))
    pieces = []
    w0, in_ch, bn = a.stage_widths[0], a.in_channels, a.bn
    planes_in, div = w0, 1
    for s, (planes, hidden) in enumerate(zip(a.stage_widths, a.hidden)):
        for b, h in enumerate(hidden):
            stride = 2 if (s > 0 and b == 0) else 1
            name = f"layer{s + 1}.{b}"
            variant, keep = a.variant_of(name), name in a.bn_blocks
            cin, d_in = planes_in, div
            sc = "id" if (stride == 1 and cin == planes) else a.shortcut
            key = (
                f"block:in{cin}-h{h}-out{planes}-s{stride}-r/{d_in}-sc{sc}-bn{int(bn)}"
                f"-{variant}{'-keepbn' if keep else ''}"
            )

            def build(p, cin=cin, h=h, planes=planes, stride=stride, d_in=d_in, v=variant, k=keep):
                blk = BasicBlock(cin, h, planes, stride, a.shortcut, bn, v, keep_bn=k)
                r = p.resolution // d_in
                return blk, (_rand(p, cin, r, r),)

            pieces.append(Piece(key, build))
            planes_in, div = planes, div * stride
    w_last, classes = a.stage_widths[-1], a.num_classes
    head_div = div
    key = f"stemhead:in{in_ch}-w{w0}-bn{int(bn)}-last{w_last}-r/{head_div}-c{classes}"

    def build_overhead(p):
        r = p.resolution
        rl = max(1, -(-r // head_div))  # ceil: stride-2 convs with padding 1 round up
        return (
            _StemHead(in_ch, w0, bn, w_last, classes),
            (_rand(p, in_ch, r, r), _rand(p, w_last, rl, rl)),
        )

    pieces.append(Piece(key, build_overhead, overhead=True))
    return pieces


# family -> arch (ResNetArch or its dict) -> pieces
DECOMPOSERS: dict[str, Callable[..., list[Piece]]] = {"cifar_resnet": _cifar_resnet_pieces}


def register_decomposer(family: str, fn: Callable[..., list[Piece]]) -> None:
    """Teach the predictor a model family: ``fn(arch)`` returns its :class:`Piece` list."""
    DECOMPOSERS[family] = fn


def pieces_of(model_or_arch, family: str = "cifar_resnet") -> list[Piece]:
    arch = getattr(model_or_arch, "arch", model_or_arch)
    if family not in DECOMPOSERS:
        raise ValueError(
            f"no latency decomposition for model family {family!r}: {sorted(DECOMPOSERS)}"
        )
    return DECOMPOSERS[family](arch)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

Timer = Callable[[nn.Module, tuple, DeviceProfile, float], Timing]


def _default_timer(module: nn.Module, xs: tuple, p: DeviceProfile, min_run_time: float) -> Timing:
    return time_module(module, xs, p, min_run_time=min_run_time)


@dataclass
class Prediction:
    latency_ms: float
    overhead_ms: float
    blocks: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "latency_ms": round(self.latency_ms, 6),
            "overhead_ms": round(self.overhead_ms, 6),
            "blocks": [[k, round(v, 6)] for k, v in self.blocks],
        }


class LatencyPredictor:
    """Per-profile look-up table; ``predict(model_or_arch)`` = sum of block entries + overhead.

    ``timer`` (tests: a fake) measures one piece; ``machine`` (tests: a fake) replaces
    :func:`~metamorph.devices.machine.machine_info` in the fingerprint; ``rebuild`` ignores the
    cached table (its entries are measured again and the file rewritten)."""

    def __init__(
        self,
        profile: DeviceProfile | str,
        cache_dir: str | os.PathLike | None = None,
        timer: Timer | None = None,
        machine: dict | None = None,
        log: Callable[[str], None] | None = None,
        rebuild: bool = False,
    ) -> None:
        self.profile = get_profile(profile)
        self.timer = timer or _default_timer
        if timer is None:
            check_available(self.profile)
        self.machine = machine_info() if machine is None else dict(machine)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.log = log or (lambda s: None)
        key = json.dumps(
            [fingerprint(self.machine, self.profile.runtime), self.profile.timing_key()],
            sort_keys=True,
        )
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.entries: dict[str, float] = {}
        self.measured = 0  # pieces measured by this instance (0 when the cache had them all)
        self.rebuilt = False
        if rebuild:  # measure every entry again (e.g. the cached table was taken on a busy machine)
            self.rebuilt = True
        else:
            self._load()

    @property
    def path(self) -> Path:
        return self.cache_dir / f"lut-{self.profile.name}-{self.fingerprint}.json"

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("format") != FORMAT or data.get("fingerprint") != self.fingerprint:
            self.log(f"  predictor table {self.path} is stale (fingerprint changed): rebuilding")
            self.rebuilt = True
            return
        self.entries = {str(k): float(v) for k, v in data["entries"].items()}

    def save(self) -> Path:
        from metamorph.io.atomic import atomic_write_text

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": FORMAT,
            "profile": self.profile.to_dict(),
            "fingerprint": self.fingerprint,
            "machine": self.machine,
            "entries": dict(sorted(self.entries.items())),
        }
        return atomic_write_text(self.path, json.dumps(doc, indent=1))

    def _measure(self, module: nn.Module, xs: tuple) -> float:
        t = self.timer(module, xs, self.profile, float(self.profile.lut_min_run_time))
        self.measured += 1
        return float(t.median_ms)

    def _call_ms(self) -> float:
        if self.profile.runtime not in SESSION_RUNTIMES:
            return 0.0
        if CALL_KEY not in self.entries:
            x = _rand(self.profile, 3, self.profile.resolution, self.profile.resolution)
            self.entries[CALL_KEY] = self._measure(_Empty(), (x,))
        return self.entries[CALL_KEY]

    def ensure(self, models_or_archs, family: str = "cifar_resnet") -> int:
        """Measure every missing entry of these networks and save the table; returns how many
        were measured."""
        before = self.measured
        todo: dict[str, Piece] = {}
        for m in models_or_archs:
            for piece in pieces_of(m, family):
                if piece.key not in self.entries:
                    todo[piece.key] = piece
        if todo:
            self.log(f"  measuring {len(todo)} predictor entries on {self.profile.name}")
            call = self._call_ms()
            for key, piece in todo.items():
                module, xs = piece.build(self.profile)
                ms = self._measure(module.eval(), xs)
                self.entries[key] = ms if piece.overhead else max(0.0, ms - call)
            self.save()
        return self.measured - before

    def predict_detail(self, model_or_arch, family: str = "cifar_resnet") -> Prediction:
        pieces = pieces_of(model_or_arch, family)
        self.ensure([model_or_arch], family)
        blocks = [(p.key, self.entries[p.key]) for p in pieces if not p.overhead]
        overhead = sum(self.entries[p.key] for p in pieces if p.overhead)
        total = overhead
        for _, v in blocks:
            total += v
        return Prediction(total, overhead, blocks)

    def predict(self, model_or_arch, family: str = "cifar_resnet") -> float:
        """Predicted latency in ms (the profile's median): sum of entries + fixed overhead."""
        return self.predict_detail(model_or_arch, family).latency_ms
