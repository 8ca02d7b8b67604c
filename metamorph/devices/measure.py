"""End-to-end measurement of a model (or one piece of it) on a device profile.

Every runtime times the same way: ``profile.warmup`` untimed calls, then blocks of calls for at
least ``min_run_time`` seconds and at least 5 blocks (each block about 5% of ``min_run_time``),
and the median and interquartile range of the per-call time over the blocks. Eager PyTorch is
timed with ``torch.utils.benchmark.Timer.timeit`` (its thread count set for the timed region and
restored), onnxruntime and OpenVINO with their own sessions on the model exported
to ONNX, CUDA with CUDA events. The result records the machine, so figures from different
machines are never compared silently (:func:`compare`).
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from metamorph.devices.machine import check_same_machine, fingerprint, machine_info
from metamorph.devices.memory import MemoryEstimate, estimate_memory
from metamorph.devices.profiles import DeviceProfile, check_available, get_profile

OPSET = 17


@dataclass
class Timing:
    """Per-call latency over the timed blocks, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    blocks: int
    calls_per_block: int

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict:
        d = {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}
        d["iqr_ms"] = round(self.iqr_ms, 6)
        return d

    @classmethod
    def from_times(cls, per_call_s: list[float], calls: int) -> Timing:
        ms = sorted(t * 1e3 for t in per_call_s)
        if len(ms) >= 2:
            q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        else:
            q1 = q3 = ms[0]
        return cls(statistics.median(ms), q1, q3, len(ms), calls)


@dataclass
class Measurement:
    """A model measured end to end on one profile, on one machine."""

    profile: dict
    latency: Timing
    params: int
    flops: int  # forward FLOPs of one image (multiply-add = 2)
    memory: MemoryEstimate  # analytic, at the profile's batch size
    measured_memory_bytes: int | None
    measured_memory_what: str
    machine: dict
    fingerprint: str
    extra: dict = field(default_factory=dict)

    @property
    def latency_ms(self) -> float:
        return self.latency.median_ms

    @property
    def memory_mb(self) -> float:
        """The memory a budget is checked against: the runtime's measured peak where it reports
        one, else the analytic estimate (parameters + activation peak)."""
        if self.measured_memory_bytes is not None:
            return self.measured_memory_bytes / (1024 * 1024)
        return self.memory.peak_mb

    def to_dict(self) -> dict:
        return {
            "profile": self.profile["name"],
            "runtime": self.profile["runtime"],
            "threads": self.profile["threads"],
            "batch_size": self.profile["batch_size"],
            "dtype": self.profile["dtype"],
            "resolution": self.profile["resolution"],
            "latency_ms": round(self.latency.median_ms, 6),
            "latency_iqr_ms": round(self.latency.iqr_ms, 6),
            "latency": self.latency.to_dict(),
            "params": self.params,
            "flops": self.flops,
            "memory_analytic": self.memory.to_dict(),
            "memory_measured_bytes": self.measured_memory_bytes,
            "memory_measured_what": self.measured_memory_what,
            "memory_mb": round(self.memory_mb, 4),
            "machine": self.machine,
            "fingerprint": self.fingerprint,
            "profile_config": self.profile,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        lat = {k: v for k, v in d["latency"].items() if k != "iqr_ms"}
        mem = {
            k: v
            for k, v in d["memory_analytic"].items()
            if k in MemoryEstimate.__dataclass_fields__
        }
        return cls(
            profile=d["profile_config"],
            latency=Timing(**lat),
            params=d["params"],
            flops=d["flops"],
            memory=MemoryEstimate(**mem),
            measured_memory_bytes=d.get("memory_measured_bytes"),
            measured_memory_what=d.get("memory_measured_what", ""),
            machine=d["machine"],
            fingerprint=d["fingerprint"],
        )


def compare(a: Measurement, b: Measurement, allow_different_machines: bool = False) -> float:
    """Latency ratio ``a / b``; refuses figures from different profiles or machines unless
    ``allow_different_machines`` (different profiles are never comparable)."""
    if a.profile["name"] != b.profile["name"] or a.profile != b.profile:
        raise ValueError(
            f"the measurements are on different device profiles ({a.profile['name']} vs "
            f"{b.profile['name']}); compare figures of one profile"
        )
    check_same_machine(a.machine, b.machine, a.profile["runtime"], allow=allow_different_machines)
    return a.latency_ms / b.latency_ms


# ----------------------------------------------------------------------------------------------
# Timing loops
# ----------------------------------------------------------------------------------------------


def _blocked(fn: Callable[[], None], warmup: int, min_run_time: float, sync=None) -> Timing:
    """Warm up, then time blocks of calls (each about 5% of ``min_run_time``) until
    ``min_run_time`` has passed and at least 5 blocks ran."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    singles = []
    for _ in range(3):  # block size from the median of three single calls
        t0 = time.perf_counter()
        fn()
        sync()
        singles.append(time.perf_counter() - t0)
    one = max(statistics.median(singles), 1e-7)
    calls = max(1, int(min_run_time * 0.05 / one))
    times, total = [], 0.0
    while total < min_run_time or len(times) < 5:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        dt = time.perf_counter() - t0
        times.append(dt / calls)
        total += dt
    return Timing.from_times(times, calls)


@contextmanager
def _torch_threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _inputs(x) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _time_torch_cpu(module: nn.Module, x, p: DeviceProfile, min_run_time: float):
    from torch.utils.benchmark import Timer

    xs = _inputs(x)
    with torch.inference_mode(), _torch_threads(p.threads):
        for _ in range(p.warmup):
            module(*xs)
        timer = Timer("module(*xs)", globals={"module": module, "xs": xs}, num_threads=p.threads)
        one = max(statistics.median(timer.timeit(1).median for _ in range(3)), 1e-7)
        calls = max(1, int(min_run_time * 0.05 / one))
        times, total = [], 0.0
        while total < min_run_time or len(times) < 5:  # blocks as in _blocked
            t = timer.timeit(calls).median  # per call
            times.append(t)
            total += t * calls
    return Timing.from_times(times, calls)


def _time_cuda(module: nn.Module, x, p: DeviceProfile, min_run_time: float):
    dev = torch.device("cuda")
    module = module.to(dev)
    xs = tuple(t.to(dev) for t in _inputs(x))
    if p.dtype == "float16":
        module, xs = module.half(), tuple(t.half() for t in xs)
    with torch.inference_mode():
        for _ in range(p.warmup):
            module(*xs)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        module(*xs)
        end.record()
        torch.cuda.synchronize()
        one = max(start.elapsed_time(end) / 1e3, 1e-7)
        calls = max(1, int(min_run_time * 0.05 / one))
        times, total = [], 0.0
        while total < min_run_time or len(times) < 5:
            start.record()
            for _ in range(calls):
                module(*xs)
            end.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(end) / 1e3
            times.append(dt / calls)
            total += dt
    return Timing.from_times(times, calls)


def export_graph(module: nn.Module, x, path: Path) -> None:
    """ONNX of ``module`` at ``x``'s shape with a dynamic batch axis. A whole
    :class:`~metamorph.models.resnet_cifar.CifarResNet` at 32x32 goes through the deployment path
    (:func:`metamorph.export.formats.export_onnx`, the legacy exporter, so every graph timed here
    comes from one exporter); pieces of a network and other resolutions are exported the same
    way with their own example input."""
    from metamorph.models.resnet_cifar import CifarResNet

    module = module.eval().cpu()
    xs = _inputs(x)
    if isinstance(module, CifarResNet) and tuple(xs[0].shape[1:]) == (
        module.arch.in_channels,
        32,
        32,
    ):
        from metamorph.export.formats import export_onnx

        export_onnx(module, path, opset=OPSET, exporter="legacy")
        return
    sink = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
        warnings.simplefilter("ignore")
        names = [f"input{i}" for i in range(len(xs))]
        torch.onnx.export(
            module,
            xs,
            str(path),
            dynamo=False,
            input_names=names,
            dynamic_axes={n: {0: "batch"} for n in names},
            opset_version=OPSET,
        )


def _ort_session(path: Path, p: DeviceProfile):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(p.threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _time_onnxruntime(module: nn.Module, x, p: DeviceProfile, min_run_time: float):
    xs = _inputs(x)
    with tempfile.TemporaryDirectory(prefix="metamorph-ort-") as d:
        path = Path(d) / "model.onnx"
        export_graph(module, xs, path)
        sess = _ort_session(path, p)
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), xs)}
    return _blocked(lambda: sess.run(None, feed), p.warmup, min_run_time)


def _time_openvino(module: nn.Module, x, p: DeviceProfile, min_run_time: float):
    import openvino as ov

    xs = _inputs(x)
    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix="metamorph-ov-") as d:
        path = Path(d) / "model.onnx"
        export_graph(module, xs, path)
        model = core.read_model(str(path))
    # static shapes, as deployed (OpenVINO runs dynamic shapes slower)
    model.reshape({inp.get_any_name(): list(t.shape) for inp, t in zip(model.inputs, xs)})
    compiled = core.compile_model(
        model,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": int(p.threads),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",  # else bf16 on CPUs with AVX512-BF16 / AMX
        },
    )
    req = compiled.create_infer_request()
    feed = {i: t.numpy() for i, t in enumerate(xs)}
    return _blocked(lambda: req.infer(feed), p.warmup, min_run_time)


# runtime -> timer(module, example input, profile, min_run_time) -> Timing
TIMERS: dict[str, Callable[..., Timing]] = {
    "torch_cpu": _time_torch_cpu,
    "onnxruntime": _time_onnxruntime,
    "openvino": _time_openvino,
    "cuda": _time_cuda,
}


def time_module(
    module: nn.Module,
    x,
    profile: DeviceProfile | str,
    min_run_time: float | None = None,
) -> Timing:
    """Latency of ``module(*x)`` on ``profile`` (``x`` a tensor or a tuple of tensors, already at
    the profile's batch size). ``min_run_time`` defaults to the profile's whole-model setting."""
    p = get_profile(profile)
    check_available(p)
    module = module.eval().cpu()
    xs = tuple(t.cpu() for t in _inputs(x))
    return TIMERS[p.runtime](module, xs, p, float(min_run_time or p.min_run_time))


def cpu_latency_ms(
    model: nn.Module, batch_size: int = 1, threads: int | None = None, min_run_time: float = 0.5
) -> float:
    """Median eager-PyTorch CPU latency (ms) of ``model`` at 32x32: :func:`time_module` on an
    ad-hoc ``torch_cpu`` profile of ``threads`` (default: torch's current count) and
    ``batch_size``; :func:`measure_model` on a named profile gives the IQR, memory and machine."""
    threads = int(threads or torch.get_num_threads())
    p = DeviceProfile(
        name=f"torch_cpu{threads}_b{batch_size}",
        threads=threads,
        batch_size=int(batch_size),
        warmup=1,
        min_run_time=float(min_run_time),
    )
    in_ch = model.arch.in_channels if hasattr(model, "arch") else 3
    return time_module(model, torch.randn(batch_size, in_ch, 32, 32), p).median_ms


def _measured_memory(model: nn.Module, x: torch.Tensor, p: DeviceProfile) -> tuple[int | None, str]:
    if p.runtime != "cuda":
        return None, (
            f"not reported: {p.runtime} exposes no peak-memory figure for a session "
            "(process RSS would include the interpreter and libraries, not the model)"
        )
    dev = torch.device("cuda")
    model = model.to(dev)
    x = x.to(dev)
    if p.dtype == "float16":
        model, x = model.half(), x.half()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        model(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(dev)
    model.cpu()
    return int(peak), "torch.cuda.max_memory_allocated during one forward (weights included)"


def measure_model(
    model: nn.Module, profile: DeviceProfile | str, min_run_time: float | None = None
) -> Measurement:
    """Latency (median, IQR), parameters, FLOPs and memory of ``model`` on ``profile``.

    Raises :class:`~metamorph.devices.profiles.DeviceUnavailable` naming what to install if the
    profile cannot run here."""
    from metamorph.utils.profile import count_flops, count_params

    p = get_profile(profile)
    check_available(p)
    model = model.eval().cpu()
    in_ch = model.arch.in_channels if hasattr(model, "arch") else 3
    shape = (p.batch_size, in_ch, p.resolution, p.resolution)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    dtype = torch.float16 if p.dtype == "float16" else torch.float32
    memory = estimate_memory(model, shape, dtype)
    flops = count_flops(model, (1, in_ch, p.resolution, p.resolution))
    timing = TIMERS[p.runtime](model, x, p, float(min_run_time or p.min_run_time))
    measured, what = _measured_memory(model, x, p)
    model.cpu().float()
    info = machine_info()
    return Measurement(
        profile=p.to_dict(),
        latency=timing,
        params=count_params(model),
        flops=flops,
        memory=memory,
        measured_memory_bytes=measured,
        measured_memory_what=what,
        machine=info,
        fingerprint=fingerprint(info, p.runtime),
    )
