#!/usr/bin/env python
"""Training-step benchmark: a metamorphic step vs a plain step of the same network (issue 27).

One command, one JSON line at the end (every figure from the same run, so ratios are
meaningful on a busy machine):

    OMP_NUM_THREADS=2 python scripts/bench_train_step.py            # CPU (and CUDA if present)

(a) emission: every metamorphic tensor of ResNet-20 / ResNet-56 (full-network INR 256 x 4 x 16)
    at full width, noise-free, vs the fp32 matmul throughput measured right before;
(b) steps: metamorphic / plain step at batch 128 for NeuMeta's last block (ResNet-20) and the
    full network (ResNet-20, ResNet-56), eager, with per-row/column noise (``axis``), stacked
    heads (``batched``) and with the compiled INR trunk (``compiled``; its compiling steps are
    warm-up);
(c) contention: (a) and the ResNet-20 full-network step again beside a second 2-thread matmul
    job, at the chosen thread count and at one thread;
(d) FLOPs of each step (INR forward + backward, network, plain step): the ratio no step can
    beat at equal throughput.

``--base <model file>`` runs the earlier benchmark instead (the NeuMeta CPU recipe's step with
the frozen prefix shared or not and 1-3 shapes per step), unchanged.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metamorph.cli.bench_steps import SCOPES
from metamorph.hypernet.inr import INRConfig
from metamorph.hypernet.metanet import MetaResNet, MetaSpec
from metamorph.hypernet.sampling import SamplingConfig
from metamorph.io.model_file import load_model
from metamorph.tasks.metamorph import LossConfig, MetamorphConfig, MetamorphModule
from metamorph.tasks.metamorph_train import prepare_base

VARIANTS = {
    "plain, 1 shape": (False, "uniform", 1, 2),
    "shared prefix, 1 shape": (True, "uniform", 1, 2),
    "shared prefix, full + 1 shape": (True, "uniform", 2, 2),
    "shared prefix, sandwich 3 shapes": (True, "sandwich", 3, 0),
}


def time_variant(prepared, share, mode, widths, full_every, steps, warmup, batch) -> float:
    cfg = MetamorphConfig(
        spec=MetaSpec(["layer3.2"]),
        inr=INRConfig(hidden=256, layers=4, freqs=16),
        sampling=SamplingConfig(mode=mode, full_width_every=full_every, widths_per_step=widths),
        loss=LossConfig(ce=1, recon=10, recon_type="mse", recon_always=True, reg=1e-4, kd=1),
        share_prefix=share,
    )
    net = MetaResNet(prepared, cfg.spec, cfg.inr)
    module = MetamorphModule(net, cfg, teacher=net.prepared_network())
    module.log = lambda *a, **k: None
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = module.training_step((x, y), i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.on_train_batch_end(None, None, i)
        times.append(time.perf_counter() - t)
    times = sorted(times[warmup:])
    return 1000 * times[len(times) // 2]


def recipe_main(a) -> None:
    prepared, _ = prepare_base(load_model(a.base), fold=True, permute=False, time_limit=0.1)
    out = {}
    for name, v in VARIANTS.items():
        out[name] = round(time_variant(prepared, *v, a.steps, a.warmup, a.batch), 1)
        print(f"{name:>34}: {out[name]:7.1f} ms/step (median of {a.steps})", flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "ms_per_step": out}))


def emission(models, device, repeats, log) -> dict:
    from metamorph.cli.bench import bench_emission, build_metanet, matmul_gflops

    out = {}
    for model in models:
        net = build_metanet(model, SCOPES["full"][1]).to(device).eval()
        sq = matmul_gflops(1024, 1024, 1024, max(5, repeats), device)
        e = bench_emission(net, device, repeats, 1, [1], 0.0)
        out[model] = {
            "emit_ms": round(e["emit_ms"], 1),
            "inr_gflops": round(e["inr_gflops"], 1),
            "matmul_gflops": round(sq, 1),
            "efficiency": round(e["inr_gflops"] / sq, 3),
        }
        log(
            f"  emission {model}: {e['emit_ms']:.1f} ms, {e['inr_gflops']:.1f} GFLOP/s = "
            f"{e['inr_gflops'] / sq:.2f} of the matmul's {sq:.1f}"
        )
    return out


def ratios_main(a) -> None:
    from metamorph.cli.bench_steps import Contention, step_ratios

    t0 = time.time()
    threads = a.threads or torch.get_num_threads()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    variants = ["eager", "axis", "batched"] + ([] if a.no_compile else ["compiled"])
    cases = [("resnet20", "last_block"), ("resnet20", "full"), ("resnet56", "full")]
    summary = {"threads": threads, "batch": a.batch, "repeats": a.repeats, "devices": {}}
    for dev in devices:
        torch.set_num_threads(threads)
        print(f"[{dev}] {threads} thread(s), batch {a.batch}", flush=True)
        d = {"emission": emission(["resnet20", "resnet56"], dev, a.repeats, print)}
        d["steps"] = step_ratios(cases, variants, a.batch, dev, a.repeats, a.warmup)
        summary["devices"][str(dev)] = d
    if not a.no_flops:  # what a step cannot beat at equal throughput
        from metamorph.cli.bench_steps import flop_bound

        summary["flops"] = {}
        for model, scope in cases:
            f = summary["flops"][f"{model}/{scope}"] = flop_bound(model, scope, a.batch)
            print(
                f"  FLOPs {model}/{scope}: INR {f['inr_gflop_query']} GFLOP (axis "
                f"{f['inr_gflop_axis']}) + network {f['network_gflop']} vs plain "
                f"{f['plain_gflop']}: bound {f['flop_ratio_query']}x ({f['flop_ratio_axis']}x axis)",
                flush=True,
            )
    if not a.no_contention:
        cpu = torch.device("cpu")
        c = {"job": "2-thread 1024^3 fp32 matmul loop, another process"}
        for n in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n)
            print(f"[contention] {n} thread(s) beside the 2-thread job", flush=True)
            with Contention(2):
                em = emission(["resnet20"], cpu, a.repeats, print)
                st = step_ratios(
                    [("resnet20", "full")], ["eager"], a.batch, cpu, a.repeats, a.warmup
                )
            c[f"threads_{n}"] = {"emission": em, "steps": st}
        alone = summary["devices"]["cpu"]
        for n in sorted({threads, 1}, reverse=True):
            beside = c[f"threads_{n}"]
            beside["emission_slowdown"] = round(
                beside["emission"]["resnet20"]["emit_ms"]
                / alone["emission"]["resnet20"]["emit_ms"],
                2,
            )
            beside["step_slowdown"] = round(
                beside["steps"]["resnet20/full/eager"]["metamorph_ms"]
                / alone["steps"]["resnet20/full/eager"]["metamorph_ms"],
                2,
            )
            print(
                f"  {n} thread(s): emission {beside['emission_slowdown']:.2f}x slower, "
                f"metamorphic step {beside['step_slowdown']:.2f}x slower than alone at {threads}",
                flush=True,
            )
        summary["contention"] = c
        torch.set_num_threads(threads)
    summary["time_s"] = round(time.time() - t0, 1)
    print(json.dumps(summary))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--base", default=None, help="model file: run the earlier recipe benchmark")
    ap.add_argument("--steps", type=int, default=20, help="(--base) timed steps per variant")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps / emissions (median)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    ap.add_argument("--no-contention", action="store_true", help="skip the contention mode")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count of each step")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.base:
        a.warmup = 5 if a.warmup is None else a.warmup
        recipe_main(a)
    else:
        a.warmup = 1 if a.warmup is None else a.warmup
        ratios_main(a)


if __name__ == "__main__":
    main()
