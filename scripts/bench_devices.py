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
from metamorph.devices.validation import (  # noqa: E402
    plot_validation,
    random_archs,
    spearman,
    validate,
)
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
    ap.add_argument("--parts", default="latency,predictor", help="latency and/or predictor")
    ap.add_argument("--method", default="isolated", help="predictor tables: isolated | chain")
    ap.add_argument(
        "--also-method",
        default="",
        help="part 2 also scores a table of this method (chain | isolated) against the same "
        "end-to-end figures (a paired comparison)",
    )
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

    parts = {x for x in args.parts.split(",") if x}
    if not parts <= {"latency", "predictor"}:
        ap.error(f"--parts {args.parts}: choose from latency, predictor")

    # part 1: the two networks at full width and three sampled shapes
    latency = []
    for arch in archs if "latency" in parts else []:
        src, shapes = shapes_of(arch, MODELS.get(arch, ""))
        for p in profiles:
            pred = LatencyPredictor(p, cache_dir=args.cache_dir, method=args.method)
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
    for p in profiles if "predictor" in parts else []:
        for arch in archs:
            ref = fold_batchnorm(metamorph.create_model(arch).eval())  # the drift check
            ref0 = measure_model(ref, p).latency_ms
            pred = LatencyPredictor(p, cache_dir=args.cache_dir, method=args.method)
            r = validate(p, arch, args.n, args.seed, predictor=pred)
            png = plot_validation(r, out_dir / f"lut_{p.name}_{arch}.png")
            (out_dir / f"lut_{p.name}_{arch}.json").write_text(json.dumps(r, indent=1))
            val.append({k: r[k] for k in ("profile", "arch", "n", "mape_pct", "spearman", "entries")}
                       | {"method": args.method, "png": str(png.relative_to(ROOT))})  # fmt: skip
            if args.also_method:  # the same end-to-end figures against the other table
                other = LatencyPredictor(p, cache_dir=args.cache_dir, method=args.also_method)
                shapes = [a for _, a in random_archs(arch, args.n, args.seed)]
                other.ensure(shapes)
                pr = [other.predict(a) for a in shapes]
                me = [row["measured_ms"] for row in r["rows"]]
                mape = 100.0 * sum(abs(x - y) / y for x, y in zip(pr, me)) / len(me)
                val.append({"profile": p.name, "arch": arch, "n": args.n, "method": args.also_method,
                            "mape_pct": round(mape, 3), "spearman": round(spearman(pr, me), 4),
                            "entries": len(other.entries), "png": "-"})  # fmt: skip
            drift = round(measure_model(ref, p).latency_ms / ref0, 4)
            for row in val:  # full width measured before the table and after the validation
                if row["profile"] == p.name and row["arch"] == arch:
                    row["drift"] = drift
    print("\n(drift: the full-width network's latency after the validation / before its table; "
          "far from 1, the machine's speed changed during the run and the row is not valid)")  # fmt: skip
    print(
        "\n| profile | arch | method | shapes | MAPE % | Spearman | table entries | drift | plot |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in val:
        print(f"| {r['profile']} | {r['arch']} | {r['method']} | {r['n']} | {r['mape_pct']:.2f} | "
              f"{r['spearman']:.3f} | {r['entries']} | {r['drift']:.3f} | {r['png']} |")  # fmt: skip
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
