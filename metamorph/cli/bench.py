"""``metamorph-bench``: what a metamorphic network costs to emit and to train.

(a) Emission: median time to emit every metamorphic tensor of each network at full width
    (full-network scope, ``MetaSpec(blocks=["all"])``, INR from the ``hypernet`` group), the INR's
    FLOPs for it (``FlopCounterMode``), the achieved GFLOP/s against this machine's fp32 matmul
    throughput measured in the same run, and the cost of K-sample averaging (K = 1, 10, ...).
(b) Training: one metamorphic step (emit + functional forward + cross-entropy + backward + AdamW)
    vs one plain step of the same network at the same batch size, both with BatchNorm (as
    ``task=pretrain`` trains it) and BN-folded (as the metamorphic network runs it); AdamW.
(c) Peak memory of each: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU, in a fresh
    subprocess per mode, the growth of the peak resident set size (``VmHWM``) during the
    training steps over the RSS after setup (the high-water mark is reset there through
    ``/proc/self/clear_refs``, so neither import-time peaks nor the parent process count).

Random weights by default; ``ckpt=`` benchmarks a trained metamorphic checkpoint's own network.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from metamorph.cli.entry import entry_point
from metamorph.config.schema import typed
from metamorph.hypernet.inr import INRConfig
from metamorph.hypernet.metanet import MetaResNet, MetaSpec
from metamorph.models import create_model, fold_batchnorm
from metamorph.models.resnet_cifar import CifarResNet, ResNetArch

# The memory subprocesses import this module: keep Lightning out of its imports (seconds each).
MEMORY_METHOD_CPU = (
    "CPU: one fresh subprocess per mode; after building the network, optimizer and batch, the "
    "peak-RSS high-water mark is reset to the current RSS (Linux /proc/self/clear_refs = 5); "
    "delta = VmHWM (/proc/self/status) after the training steps - VmRSS at the reset, so it "
    "includes activations, gradients, emitted weights, optimizer state and one-time allocations "
    "of the first step (getrusage ru_maxrss is not used: it inherits the parent's RSS at exec)"
)
MEMORY_METHOD_CUDA = (
    "CUDA: torch.cuda.max_memory_allocated during the training steps - memory_allocated after "
    "building the network, optimizer and batch"
)
MODES = ("metamorph", "plain", "plain_folded")

# ----------------------------------------------------------------------------------------------
# Building the networks
# ----------------------------------------------------------------------------------------------


def build_metanet(model: str, inr: INRConfig) -> MetaResNet:
    """A randomly initialised ``model`` (BN folded) with every BasicBlock metamorphic."""
    base = create_model(model).eval()
    fold_batchnorm(base)
    return MetaResNet(base, MetaSpec(blocks=["all"]), inr)


def plain_network(arch: ResNetArch, bn: bool = True) -> CifarResNet:
    """The same architecture as a plain network: with BatchNorm (``bn=True``, how
    ``task=pretrain`` trains it) or BN-folded like the metamorphic network runs it."""
    d = arch.to_dict()
    d["bn"] = bool(bn)
    return CifarResNet(ResNetArch.from_dict(d))


def load_ckpt_net(path: str) -> tuple[MetaResNet, float]:
    from metamorph.export.sample import load_metamorphic

    module = load_metamorphic(path)
    return module.net, float(module.cfg.coord_noise)


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(max(0, warmup)):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_gflops(m: int, k: int, n: int, repeats: int, device: torch.device) -> float:
    """fp32 throughput of an (m x k) @ (k x n) matmul, median GFLOP/s."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device)
    b = torch.randn(k, n, generator=g).to(device)
    t = median_time(lambda: a @ b, max(3, repeats), 2, device)
    return 2.0 * m * k * n / t / 1e9


# ----------------------------------------------------------------------------------------------
# (a) emission
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def bench_emission(
    net: MetaResNet,
    device: torch.device,
    repeats: int,
    warmup: int,
    k_values: list[int],
    noise: float,
) -> dict:
    full = net.full_shape
    emitted = net.emit(full)
    n_weights = sum(t.numel() for t in emitted.values())
    with FlopCounterMode(display=False) as fc:
        net.emit(full)
    flops = int(fc.get_total_flops())
    t_emit = median_time(lambda: net.emit(full), repeats, warmup, device)
    out = {
        "tensors": len(emitted),
        "weights": n_weights,
        "emit_ms": t_emit * 1e3,
        "inr_gflop": flops / 1e9,
        "inr_gflops": flops / t_emit / 1e9,
    }
    k_ms = {}
    for k in k_values:
        g = torch.Generator().manual_seed(0)
        k_ms[k] = 1e3 * median_time(
            lambda k=k, g=g: net.emit(full, noise=noise, generator=g, k=k), repeats, warmup, device
        )
    out["k_ms"] = {str(k): v for k, v in k_ms.items()}
    if 1 in k_ms:
        out["k_ratio"] = {str(k): v / (k * k_ms[1]) for k, v in k_ms.items()}
    return out


# ----------------------------------------------------------------------------------------------
# (b) training steps
# ----------------------------------------------------------------------------------------------


def _batch(net: MetaResNet, batch_size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, net.base_arch.in_channels, 32, 32, generator=g).to(device)
    y = torch.randint(0, net.base_arch.num_classes, (batch_size,), generator=g).to(device)
    return x, y


def metamorph_stepper(
    net: MetaResNet, batch_size: int, device: torch.device, noise: float, seed: int = 0
):
    """One metamorphic optimisation step at full width: emit (with coordinate noise) +
    functional forward + cross-entropy + backward + AdamW on the INR (and shared tensors)."""
    x, y = _batch(net, batch_size, device, seed)
    full = net.full_shape
    net.to(device).train()
    opt = torch.optim.AdamW(list(net.inr.parameters()) + list(net.shared.parameters()), lr=1e-4)
    noise_g = torch.Generator().manual_seed(seed + 1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        emitted = net.emit(full, noise=noise, generator=noise_g)
        loss = F.cross_entropy(net(x, full, emitted), y)
        loss.backward()
        opt.step()

    step.trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return step


def plain_stepper(
    net: MetaResNet, batch_size: int, device: torch.device, bn: bool = True, seed: int = 0
):
    """One plain optimisation step (AdamW) of the same network, with BatchNorm or BN-folded."""
    x, y = _batch(net, batch_size, device, seed)
    plain = plain_network(net.base_arch, bn=bn).to(device).train()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(plain(x), y)
        loss.backward()
        opt.step()

    step.trainable = sum(p.numel() for p in plain.parameters())
    return step


def bench_training(
    net: MetaResNet, batch_size: int, device: torch.device, repeats: int, warmup: int, noise: float
) -> dict:
    t_meta = median_time(metamorph_stepper(net, batch_size, device, noise), repeats, warmup, device)
    t_plain = median_time(plain_stepper(net, batch_size, device), repeats, warmup, device)
    t_fold = median_time(plain_stepper(net, batch_size, device, bn=False), repeats, warmup, device)
    return {
        "metamorph_step_ms": t_meta * 1e3,
        "plain_step_ms": t_plain * 1e3,
        "plain_folded_step_ms": t_fold * 1e3,
        "ratio": t_meta / t_plain,
        "ratio_vs_folded": t_meta / t_fold,
    }


# ----------------------------------------------------------------------------------------------
# (c) memory
# ----------------------------------------------------------------------------------------------


def _proc_status_mb(key: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, in MiB (None if absent)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset this process's peak-RSS high-water mark to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_worker(args: dict) -> dict:
    """Run in a fresh process: build one mode's training step, then measure the peak memory
    growth over ``steps`` steps: resident set size on the CPU (high-water mark reset after
    setup), allocated memory on CUDA."""
    torch.set_num_threads(int(args["threads"]))
    device = torch.device(args["device"])
    if args.get("ckpt"):
        net, _ = load_ckpt_net(args["ckpt"])
    else:
        net = build_metanet(args["model"], INRConfig(**args["inr"]))
    bs = int(args["batch_size"])
    mode = args["mode"]
    if mode == "metamorph":
        step = metamorph_stepper(net, bs, device, args["noise"])
    else:
        step = plain_stepper(net, bs, device, bn=mode == "plain")
        del net  # only the plain network stays resident
    info = {
        "trainable_params": step.trainable,
        "adamw_state_mb": 2 * 4 * step.trainable / 2**20,  # exp_avg + exp_avg_sq, fp32
    }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        for _ in range(int(args["steps"])):
            step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return {**info, "before_mb": before, "peak_mb": peak, "delta_mb": peak - before}
    reset = _reset_rss_peak()
    before = _proc_status_mb("VmRSS")
    for _ in range(int(args["steps"])):
        step()
    peak = _proc_status_mb("VmHWM")
    if not reset or before is None or peak is None:
        raise RuntimeError(
            "peak RSS cannot be measured here (needs Linux /proc/self/status and clear_refs)"
        )
    return {**info, "before_mb": before, "peak_mb": peak, "delta_mb": peak - before}


def bench_memory(
    model: str | None,
    ckpt: str | None,
    inr: INRConfig,
    batch_size: int,
    steps: int,
    threads: int,
    device: torch.device,
    noise: float,
    timeout: float,
) -> dict:
    out = {}
    for mode in MODES:
        args = {
            "mode": mode,
            "model": model,
            "ckpt": ckpt,
            "inr": asdict(inr),
            "batch_size": batch_size,
            "steps": steps,
            "threads": threads,
            "device": str(device),
            "noise": noise,
        }
        code = (
            "import json, sys; from metamorph.cli.bench import memory_worker; "
            "print('MEMORY ' + json.dumps(memory_worker(json.loads(sys.argv[1]))))"
        )
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"memory measurement ({mode}) failed with exit status {proc.returncode}:\n"
                f"{proc.stderr[-2000:]}"
            )
        out[mode] = json.loads(lines[-1].removeprefix("MEMORY "))
    res = {}
    for mode in MODES:
        for key in ("peak_mb", "delta_mb", "before_mb", "trainable_params", "adamw_state_mb"):
            res[f"{mode}_{key}"] = out[mode][key]
    for ref in ("plain", "plain_folded"):
        if out[ref]["delta_mb"] > 0:
            key = "delta_ratio" if ref == "plain" else "delta_ratio_vs_folded"
            res[key] = out["metamorph"]["delta_mb"] / out[ref]["delta_mb"]
    return res


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------


# Step / emission time ratios measured on a 2-core CPU (docs/RESULTS.md section 3, session 4):
# a metamorphic training step ~6-8x one full emission, a plain step ~1/3.4 of a metamorphic one.
STEP_PER_EMISSION = 7.0
PLAIN_PER_META_STEP = 1 / 3.4
SUBPROCESS_START_S = 10.0  # a fresh interpreter importing torch + lightning (memory figures)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def estimate_seconds(cfg: DictConfig, nets: dict, device: torch.device, k_values) -> float:
    """A rough duration of the whole bench, from one timed emission per network: the figures'
    repeat counts times the probe, and the step/emission ratios above for training and memory."""
    total = 0.0
    warmup, repeats = int(cfg.warmup), int(cfg.repeats)
    for net in nets.values():
        net.to(device).eval()
        full = net.full_shape
        net.emit(full)  # first call: allocations
        t0 = time.perf_counter()
        net.emit(full)
        _sync(device)
        t_emit = time.perf_counter() - t0
        net.to("cpu")
        total += 2.0 + (warmup + repeats) * t_emit * (1 + sum(k_values))  # + the matmuls
        t_step = STEP_PER_EMISSION * t_emit * int(cfg.batch_size) / 128
        if cfg.train:
            reps = warmup + int(cfg.train_repeats)
            total += reps * t_step * (1 + 2 * PLAIN_PER_META_STEP)
        if cfg.memory:
            total += 3 * (SUBPROCESS_START_S + (int(cfg.memory_steps) + 1) * t_step)
    return total


def run(cfg: DictConfig, log=print) -> dict:
    """The benchmark; with ``contention=true`` all of it runs beside a second job (a
    ``contention_threads``-thread matmul loop in another process)."""
    if cfg.get("contention"):
        from metamorph.cli.bench_steps import Contention

        n = int(cfg.get("contention_threads", 2))
        if n < 1:
            raise ValueError(f"contention_threads={n} must be at least 1")
        log(f"[metamorph-bench] beside a second job: a {n}-thread fp32 matmul loop")
        with Contention(n):
            s = _run(cfg, log)
        s["contention"] = {"job": f"{n}-thread 1024^3 fp32 matmul loop, another process"}
        return s
    return _run(cfg, log)


def _run(cfg: DictConfig, log=print) -> dict:
    t0 = time.time()
    threads = int(cfg.threads) if cfg.threads else torch.get_num_threads()
    if threads < 1:
        raise ValueError(f"threads={cfg.threads} must be at least 1")
    torch.set_num_threads(threads)
    from metamorph.runtime.device import resolve_device

    device = resolve_device(str(cfg.device))
    inr = typed(INRConfig, cfg.hypernet, "hypernet")
    k_values = sorted({int(k) for k in cfg.k_values})
    if not k_values or min(k_values) < 1:
        raise ValueError(f"k_values={list(cfg.k_values)} must be positive integers")
    if 1 not in k_values:
        k_values = [1, *k_values]
    repeats, warmup = int(cfg.repeats), int(cfg.warmup)
    if cfg.ckpt:
        net, noise = load_ckpt_net(str(cfg.ckpt))
        nets = {f"resnet{net.base_arch.depth} (ckpt)": net}
        inr = net.inr.cfg
    else:
        noise = float(cfg.coord_noise)
        nets = {str(m): build_metanet(str(m), inr) for m in cfg.models}
    if not nets:
        raise ValueError("models= is empty: name at least one network, e.g. models=[resnet20]")
    summary: dict = {
        "device": str(device),
        "threads": threads,
        "batch_size": int(cfg.batch_size),
        "hypernet": asdict(inr),
        "ckpt": str(cfg.ckpt) if cfg.ckpt else None,
    }
    n, rows = int(cfg.matmul_size), int(cfg.matmul_rows)

    def matmuls() -> tuple[float, float]:
        reps = max(5, repeats)
        return (
            matmul_gflops(n, n, n, reps, device),
            matmul_gflops(rows, inr.hidden, inr.hidden, reps, device),
        )

    log(
        f"[metamorph-bench] {device}, {threads} thread(s); INR hidden={inr.hidden} "
        f"layers={inr.layers} freqs={inr.freqs}; batch {cfg.batch_size}"
    )
    est = estimate_seconds(cfg, nets, device, k_values)
    summary["estimated_s"] = round(est, 1)
    log(
        f"  estimated duration: about {_duration(est)} (from one emission per network; "
        "train=false memory=false models=[resnet20] run in a fraction of it)"
    )
    summary["matmul"] = {"square_n": n, "inr_shaped": [rows, inr.hidden, inr.hidden]}
    summary["emission"], summary["training"], summary["memory"] = {}, {}, {}
    for name, net in nets.items():
        net.to(device).eval()
        # The reference throughput is measured right before each emission figure, so both see
        # the same machine load.
        sq, inr_shaped = matmuls()
        log(
            f"  fp32 matmul: {sq:.1f} GFLOP/s ({n}x{n} square), {inr_shaped:.1f} GFLOP/s "
            f"({rows}x{inr.hidden} @ {inr.hidden}x{inr.hidden}, INR-layer shaped)"
        )
        summary["matmul"]["square_gflops"] = max(sq, summary["matmul"].get("square_gflops", 0))
        summary["matmul"]["inr_shaped_gflops"] = max(
            inr_shaped, summary["matmul"].get("inr_shaped_gflops", 0)
        )
        e = bench_emission(net, device, repeats, warmup, k_values, noise)
        e["matmul_square_gflops"] = sq
        e["matmul_inr_shaped_gflops"] = inr_shaped
        e["efficiency"] = e["inr_gflops"] / sq
        e["efficiency_vs_inr_shaped"] = e["inr_gflops"] / inr_shaped
        summary["emission"][name] = e
        log(
            f"  {name}: emit {e['tensors']} tensors ({e['weights']:,} weights) in "
            f"{e['emit_ms']:.1f} ms; INR {e['inr_gflop']:.3f} GFLOP -> {e['inr_gflops']:.1f} "
            f"GFLOP/s = {100 * e['efficiency']:.1f}% of square matmul "
            f"({100 * e['efficiency_vs_inr_shaped']:.1f}% of INR-shaped matmul)"
        )
        for k in k_values:
            ratio = e.get("k_ratio", {}).get(str(k))
            log(
                f"    K={k}: {e['k_ms'][str(k)]:.1f} ms"
                + ("" if ratio is None else f" ({ratio:.2f}x of {k} single emissions)")
            )
        if cfg.train:
            t = bench_training(
                net, int(cfg.batch_size), device, int(cfg.train_repeats), warmup, noise
            )
            summary["training"][name] = t
            log(
                f"    training step (batch {cfg.batch_size}): metamorphic "
                f"{t['metamorph_step_ms']:.1f} ms vs plain {t['plain_step_ms']:.1f} ms with BN "
                f"({t['ratio']:.2f}x), {t['plain_folded_step_ms']:.1f} ms BN-folded "
                f"({t['ratio_vs_folded']:.2f}x)"
            )
        net.to("cpu")
        if cfg.memory:
            m = bench_memory(
                None if cfg.ckpt else name,
                str(cfg.ckpt) if cfg.ckpt else None,
                inr,
                int(cfg.batch_size),
                int(cfg.memory_steps),
                threads,
                device,
                noise,
                float(cfg.memory_timeout),
            )
            summary["memory"][name] = m
            unit = "peak RSS" if device.type == "cpu" else "peak allocated"
            log(
                f"    memory ({unit} growth over {cfg.memory_steps} step(s) from setup): "
                f"metamorphic +{m['metamorph_delta_mb']:.1f} MiB vs plain "
                f"+{m['plain_delta_mb']:.1f} MiB with BN, +{m['plain_folded_delta_mb']:.1f} MiB "
                f"BN-folded (peaks {m['metamorph_peak_mb']:.0f} / {m['plain_peak_mb']:.0f} / "
                f"{m['plain_folded_peak_mb']:.0f} MiB)"
            )
            log(
                f"    trainable: metamorphic {m['metamorph_trainable_params']:,} params "
                f"(AdamW state {m['metamorph_adamw_state_mb']:.1f} MiB) vs plain "
                f"{m['plain_trainable_params']:,} ({m['plain_adamw_state_mb']:.1f} MiB)"
            )
    if cfg.memory:
        summary["memory_method"] = MEMORY_METHOD_CPU if device.type == "cpu" else MEMORY_METHOD_CUDA
    if cfg.get("step_ratios"):
        from metamorph.cli.bench_steps import step_ratios

        log(
            "  (d) metamorphic / plain training step (training_step + AdamW + EMA; NeuMeta's last "
            "block and the full network, INR 256 x 4 x 16)"
        )
        cases = [("resnet20", "last_block")] + [(str(m), "full") for m in cfg.models]
        summary["step_ratios"] = step_ratios(
            cases,
            [str(v) for v in cfg.step_variants],
            int(cfg.batch_size),
            device,
            int(cfg.train_repeats),
            warmup,
            log,
        )
    summary["time_s"] = round(time.time() - t0, 1)
    return summary


@entry_point("metamorph-bench", "bench")
def main(cfg: DictConfig) -> None:
    from metamorph.runtime.summary import print_summary

    s = run(cfg)  # the user's errors: one line, exit status 2 (metamorph.cli.entry)
    print_summary(s)


if __name__ == "__main__":
    main()
