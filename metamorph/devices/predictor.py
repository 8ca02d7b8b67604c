"""A latency predictor per device profile: a look-up table of measured per-block latencies.

A network is decomposed into pieces keyed by their shapes (for the CIFAR ResNets: one entry per
BasicBlock configuration: in-width, hidden width, out-width, stride, input resolution, shortcut,
BN and variant; plus one stem+head piece). The prediction is **exactly** the sum of the network's
block entries plus its fixed overhead, the measured stem+head piece (which also carries the
runtime's per-call cost). Runtimes that run a whole graph per call (onnxruntime, OpenVINO) pay
their call cost once per model, not once per block, so their block entries are stored net of it
(the time of an empty graph).

How a block entry is measured is the table's ``method`` (part of the cache key):

- ``isolated`` (default): each block timed alone.
- ``chain``: inside a chain of :data:`CHAIN` blocks, each with its own weights, fed by
  the previous block's output, as in a network: a block that keeps its shape (stride 1, in = out)
  is timed as ``CHAIN`` copies of itself, divided by ``CHAIN``; a block that changes the shape
  (stride 2 or a new width) is timed followed by ``CHAIN - 1`` copies of the stride-1 block of its
  output shape and hidden width, whose entry (measured first, in its own chain) is subtracted.
  Timed alone, a block reuses one input and one output buffer and keeps its weights in cache, and
  a per-call cost is paid per block; in a network neither holds. Issue 21 measured the isolated
  sum 11.6% / 18.2% off (MAPE, R-20 / R-56, eager 1-thread) with the misses on narrow per-block
  widths. Not the default: in the one clean paired comparison so far (12 R-20 shapes, eager
  1-thread, shared machine at load 0.3) its entries came out ~11% above the isolated ones and it
  over-predicted (MAPE 20.3% vs 6.4%); docs/results/devices.md has the idle-machine command that
  decides.

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
METHODS = ("chain", "isolated")
CHAIN = 4  # blocks per timed chain (method "chain")
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
    # method "chain": the timed chain; entry = (time - follow_n * entry(follow)) / per
    chain: Callable[[DeviceProfile], tuple[nn.Module, tuple[torch.Tensor, ...]]] | None = None
    per: int = 1  # copies of this piece in the chain
    follow: Piece | None = None  # the shape-keeping block after it (measured first)
    follow_n: int = 0  # copies of ``follow`` in the chain


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

    def block_piece(cin, h, planes, stride, d_in, variant, keep) -> Piece:
        sc = "id" if (stride == 1 and cin == planes) else a.shortcut
        key = (
            f"block:in{cin}-h{h}-out{planes}-s{stride}-r/{d_in}-sc{sc}-bn{int(bn)}"
            f"-{variant}{'-keepbn' if keep else ''}"
        )

        def make(c=cin, st=stride):
            return BasicBlock(c, h, planes, st, a.shortcut, bn, variant, keep_bn=keep)

        def build(p):
            r = p.resolution // d_in
            return make(), (_rand(p, cin, r, r),)

        if sc == "id":  # shape-keeping: a chain of copies of itself
            piece = Piece(key, build, per=CHAIN)
        else:  # then the copies of the shape-keeping block of its output shape
            piece = Piece(key, build, per=1, follow_n=CHAIN - 1)
            piece.follow = block_piece(planes, h, planes, 1, d_in * stride, variant, keep)

        def chain(p):
            r = p.resolution // d_in
            tail = [make(planes, 1) for _ in range(piece.follow_n)]
            return nn.Sequential(*[make() for _ in range(piece.per)], *tail), (_rand(p, cin, r, r),)

        piece.chain = chain
        return piece

    for s, (planes, hidden) in enumerate(zip(a.stage_widths, a.hidden)):
        for b, h in enumerate(hidden):
            stride = 2 if (s > 0 and b == 0) else 1
            name = f"layer{s + 1}.{b}"
            variant, keep = a.variant_of(name), name in a.bn_blocks
            pieces.append(block_piece(planes_in, h, planes, stride, div, variant, keep))
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
    cached table (its entries are measured again and the file rewritten); ``method`` is how block
    entries are measured (``chain`` or ``isolated``, see the module docstring; part of the key)."""

    def __init__(
        self,
        profile: DeviceProfile | str,
        cache_dir: str | os.PathLike | None = None,
        timer: Timer | None = None,
        machine: dict | None = None,
        log: Callable[[str], None] | None = None,
        rebuild: bool = False,
        method: str = "isolated",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown predictor method {method!r}; choose one of {METHODS}")
        self.method = method
        self.profile = get_profile(profile)
        self.timer = timer or _default_timer
        if timer is None:
            check_available(self.profile)
        self.machine = machine_info() if machine is None else dict(machine)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.log = log or (lambda s: None)
        key = json.dumps(
            [fingerprint(self.machine, self.profile.runtime), self.profile.timing_key()]
            + ([] if method == "isolated" else [{"method": method, "chain": CHAIN}]),
            sort_keys=True,
        )  # "isolated" keeps the key of the tables written before methods existed
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
            "method": self.method,
            "chain": CHAIN if self.method == "chain" else 1,
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

        def add(piece: Piece) -> None:  # a chain's follow-up block is measured before it
            if self.method == "chain" and piece.follow is not None:
                add(piece.follow)
            if piece.key not in self.entries:
                todo.setdefault(piece.key, piece)

        for m in models_or_archs:
            for piece in pieces_of(m, family):
                add(piece)
        if todo:
            self.log(
                f"  measuring {len(todo)} predictor entries on {self.profile.name} ({self.method})"
            )
            call = self._call_ms()
            for key, piece in todo.items():
                self.entries[key] = self._entry(piece, call)
            self.save()
        return self.measured - before

    def _entry(self, piece: Piece, call: float) -> float:
        if piece.overhead:  # the stem + head, alone: it carries the per-call cost
            module, xs = piece.build(self.profile)
            return self._measure(module.eval(), xs)
        if self.method == "isolated" or piece.chain is None:
            module, xs = piece.build(self.profile)
            return max(0.0, self._measure(module.eval(), xs) - call)
        module, xs = piece.chain(self.profile)
        ms = self._measure(module.eval(), xs) - call
        if piece.follow_n:
            ms -= piece.follow_n * self.entries[piece.follow.key]
        return max(0.0, ms / piece.per)

    def predict_detail(self, model_or_arch, family: str = "cifar_resnet") -> Prediction:
        pieces = pieces_of(model_or_arch, family)
        self.ensure([model_or_arch], family)
        blocks = [(p.key, self.entries[p.key]) for p in pieces if not p.overhead]
        overhead = sum(self.entries[p.key] for p in pieces if p.overhead)
        total = sum(self.entries[p.key] for p in pieces)  # in the network's order
        return Prediction(total, overhead, blocks)

    def predict(self, model_or_arch, family: str = "cifar_resnet") -> float:
        """Predicted latency in ms (the profile's median): sum of entries + fixed overhead."""
        return self.predict_detail(model_or_arch, family).latency_ms
