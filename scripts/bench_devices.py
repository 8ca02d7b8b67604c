"""Device-profile benchmark (issue 21): latency with IQR of ResNet-20 / ResNet-56 at full width and
three sampled shapes on every profile that runs here, and each profile's latency-predictor
accuracy (MAPE, Spearman) on N seeded random shapes per architecture, with its PNG.

One command; prints a markdown table per part and, last, one JSON line:

    python scripts/bench_devices.py                       # N=50, all shipped profiles
    python scripts/bench_devices.py --n 6 --min-run-time 0.2 --profiles cpu1_b1,ort_cpu1_b1

Models: the converted akamaster checkpoints (``metamorph-convert src=../shared/pretrained/
akamaster-cifar10/resnet20-12fca82f.th out=outputs/models/akamaster-resnet20``, same for
resnet56), measured folded (BatchNorm in the convolutions: the deployed form). The three sampled
shapes are the first three of ``metamorph.devices.validation.random_archs(<arch>, 3, seed=1)``:
a uniform width ratio, per-block widths, per-block widths with fewer blocks per stage. Run it on
an idle machine: the figures are wall-clock latencies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import metamorph  # noqa: E402
from metamorph.devices import (  # noqa: E402
    DeviceUnavailable,
    LatencyPredictor,
    check_available,
    get_profile,
    list_profiles,
    machine_info,
    measure_model,
)
from metamorph.devices.validation import plot_validation, random_archs, validate  # noqa: E402
from metamorph.models import fold_batchnorm  # noqa: E402
from metamorph.models.resnet_cifar import CifarResNet  # noqa: E402

MODELS = {
    "resnet20": "outputs/models/akamaster-resnet20.json",
    "resnet56": "outputs/models/akamaster-resnet56.json",
}


def shapes_of(name: str, path: str):
    """(label, model) pairs: the converted checkpoint folded, and three sampled shapes."""
    p = ROOT / path
    if p.is_file():
        full = fold_batchnorm(metamorph.load(p).eval())
        src = str(path)
    else:  # the architecture alone: latency does not depend on the weights
        full = fold_batchnorm(metamorph.create_model(name).eval())
        src = f"{name} (random weights: {path} not found)"
    out = [("full", full)]
    for kind, arch in random_archs(name, 3, seed=1, bn=False):
        out.append((f"{kind} {json.dumps(arch.hidden)}", CifarResNet(arch).eval()))
    return src, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", default="", help="comma-separated (default: every shipped one)")
    ap.add_argument("--archs", default="resnet20,resnet56")
    ap.add_argument("--n", type=int, default=50, help="random shapes per (profile, arch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-run-time", type=float, default=None, help="override the profiles'")
    ap.add_argument("--out-dir", default="outputs/bench_devices")
    ap.add_argument(
        "--cache-dir",
        default=None,
        help="predictor tables (default: <out-dir>/tables, emptied first so that every table is "
        "measured in this run, on this machine's current state)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    out_dir = ROOT / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.cache_dir is None:
        args.cache_dir = out_dir / "tables"
        for f in args.cache_dir.glob("lut-*.json"):
            f.unlink()
    names = [p for p in args.profiles.split(",") if p] or list_profiles()
    archs = [a for a in args.archs.split(",") if a]
    profiles, skipped = [], {}
    for n in names:
        p = get_profile(n)
        if args.min_run_time is not None:
            p.min_run_time = args.min_run_time
        try:
            check_available(p)
            profiles.append(p)
        except DeviceUnavailable as e:
            skipped[n] = str(e)
    t0 = time.time()
    info = machine_info()
    print(
        f"# bench_devices on {info['cpu']} ({info['usable_cores']} cores), torch {info['torch']}, "
        f"onnxruntime {info['onnxruntime']}, openvino {info['openvino']}"
    )
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")

    # part 1: the two networks at full width and three sampled shapes
    latency = []
    for arch in archs:
        src, shapes = shapes_of(arch, MODELS.get(arch, ""))
        for p in profiles:
            pred = LatencyPredictor(p, cache_dir=args.cache_dir)
            for label, model in shapes:
                m = measure_model(model, p)
                latency.append({
                    "arch": arch, "source": src, "shape": label, "profile": p.name,
                    "median_ms": round(m.latency_ms, 4), "iqr_ms": round(m.latency.iqr_ms, 4),
                    "predicted_ms": round(pred.predict(model.arch), 4),
                    "flops": m.flops, "params": m.params,
                    "memory_mb": round(m.memory.peak_mb, 3),
                })  # fmt: skip
    print(
        "\n| model | shape | profile | latency ms (median) | IQR ms | predicted ms | MFLOPs | params | memory MB (analytic) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in latency:
        print(f"| {r['arch']} | {r['shape']} | {r['profile']} | {r['median_ms']:.3f} | "
              f"{r['iqr_ms']:.3f} | {r['predicted_ms']:.3f} | {r['flops'] / 1e6:.2f} | "
              f"{r['params']:,} | {r['memory_mb']:.3f} |")  # fmt: skip

    # part 2: predictor validation per profile and architecture
    val = []
    for p in profiles:
        for arch in archs:
            r = validate(p, arch, args.n, args.seed, cache_dir=args.cache_dir)
            png = plot_validation(r, out_dir / f"lut_{p.name}_{arch}.png")
            (out_dir / f"lut_{p.name}_{arch}.json").write_text(json.dumps(r, indent=1))
            val.append({k: r[k] for k in ("profile", "arch", "n", "mape_pct", "spearman", "entries")}
                       | {"png": str(png.relative_to(ROOT))})  # fmt: skip
    print("\n| profile | arch | shapes | MAPE % | Spearman | table entries | plot |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in val:
        print(f"| {r['profile']} | {r['arch']} | {r['n']} | {r['mape_pct']:.2f} | "
              f"{r['spearman']:.3f} | {r['entries']} | {r['png']} |")  # fmt: skip
    summary = {
        "machine": info,
        "latency": latency,
        "predictor": val,
        "skipped": skipped,
        "n": args.n,
        "time_s": round(time.time() - t0, 1),
    }
    (out_dir / "bench_devices.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
