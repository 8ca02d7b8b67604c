"""``metamorph-profile``: how fast and how big a model is on a device profile.

``metamorph-profile model=<file> device=cpu1_b1`` measures a plain network (model file, akamaster
``.th``) or a shape of a metamorphic checkpoint (``gamma=`` / ``hidden=``) end to end on the
profile's runtime and prints latency (median, IQR), memory, FLOPs and parameters, then its JSON
line. ``metamorph-profile lut device=... arch=resnet20`` builds (or loads from the cache) the
profile's latency predictor, validates it on ``n`` seeded random shapes against end-to-end
measurement (MAPE, Spearman) and writes the predicted-vs-measured PNG.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from metamorph.cli.entry import entry_point
from metamorph.devices import (
    DeviceUnavailable,
    LatencyPredictor,
    MachineMismatch,
    Measurement,
    ProfileError,
    compare,
    get_profile,
    measure_model,
)
from metamorph.devices.fresh import measure_file
from metamorph.runtime.summary import print_summary

COMMANDS = ("measure", "lut")


def _container(v):
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def load_for_profiling(cfg: DictConfig):
    """The network ``model=`` (``src=``) names, and a short description of it."""
    if cfg.src is None or str(cfg.src).strip() == "":
        raise ValueError(
            "model= (or src=) is required: a model file (.json), an akamaster .th, or a "
            "metamorphic checkpoint with gamma= or hidden="
        )
    path = Path(str(cfg.src))
    if not path.exists():
        raise FileNotFoundError(f"model={path} not found")
    from metamorph.runtime.checkpoints import checkpoint_kind

    kind = checkpoint_kind(path)
    shape_given = cfg.gamma is not None or cfg.hidden is not None
    if kind == "metamorph":
        from metamorph.export.sample import load_metamorphic, materialize, shape_for_target

        if not shape_given:
            raise ValueError(
                f"{path} is a metamorphic checkpoint: give the shape to measure, gamma=<ratio> "
                "or hidden=<[[w,...],...]>"
            )
        module = load_metamorphic(path)
        hidden = shape_for_target(
            module.net, gamma=cfg.gamma, hidden=_container(cfg.hidden), depth=_container(cfg.depth)
        )
        k = module.cfg.eval_k if cfg.k is None else int(cfg.k)
        model = materialize(module, hidden, k=k, seed=int(cfg.seed))
        return model, f"{path} at {json.dumps(hidden)}"
    if shape_given or cfg.depth is not None:
        raise ValueError(
            f"gamma= / hidden= / depth= pick a shape of a metamorphic checkpoint, but {path} is a "
            f"{kind}; drop them to measure the network as it is"
        )
    from metamorph.runtime.networks import load_any_model

    return load_any_model(path), str(path)


def run_measure(cfg: DictConfig) -> dict:
    profile = get_profile(str(cfg.device))
    earlier = None
    if cfg.compare is not None:
        p = Path(str(cfg.compare))
        if not p.is_file():
            raise FileNotFoundError(f"compare={p} not found (a JSON written by out= of a run)")
        earlier = Measurement.from_dict(json.loads(p.read_text()))
    if cfg.min_run_time is not None:
        profile.min_run_time = float(cfg.min_run_time)  # recorded with the result
    model, what = load_for_profiling(cfg)
    from metamorph.runtime.checkpoints import checkpoint_kind

    if checkpoint_kind(Path(str(cfg.src))) == "model_file":  # the budgets' final check measures
        m = measure_file(str(cfg.src), profile)  # written models this way too (devices.fresh)
    else:
        m = measure_model(model, profile)
    s = {"model": what, **m.to_dict()}
    if hasattr(getattr(model, "arch", None), "hidden"):  # a CIFAR ResNet's shape (not a ViT's)
        s["hidden"] = model.arch.hidden
        s["depth"] = model.arch.depth
    if earlier is not None:
        s["compare"] = str(cfg.compare)
        s["latency_ratio_vs_compare"] = round(
            compare(m, earlier, allow_different_machines=bool(cfg.allow_different_machines)), 4
        )
    if cfg.out:
        from metamorph.io.atomic import atomic_write_text

        out = Path(str(cfg.out))
        atomic_write_text(out, json.dumps(s, indent=1))
        s["out"] = str(out)
    return s


def report_measure(s: dict) -> None:
    mem = s["memory_analytic"]
    print(f"[metamorph-profile] {s['model']} on {s['profile']}")
    print(
        f"  runtime  {s['runtime']}, {s['threads'] or '-'} threads, batch {s['batch_size']}, "
        f"{s['dtype']}, {s['resolution']}x{s['resolution']}"
    )
    lat = s["latency"]
    print(
        f"  latency  {lat['median_ms']:.4f} ms median, IQR {lat['iqr_ms']:.4f} ms "
        f"[{lat['q1_ms']:.4f}, {lat['q3_ms']:.4f}] over {lat['blocks']} blocks of "
        f"{lat['calls_per_block']} calls"
    )
    print(f"  cost     {s['params']:,} params, {s['flops'] / 1e6:.2f} MFLOPs per image")
    print(
        f"  memory   {mem['peak_mb']:.3f} MB analytic = params {mem['params_bytes'] / 2**20:.3f} MB"
        f" + activation peak {mem['activation_peak_bytes'] / 2**20:.3f} MB (all activations "
        f"{mem['activation_total_bytes'] / 2**20:.3f} MB)"
    )
    if s["memory_measured_bytes"] is None:
        print(f"           measured: {s['memory_measured_what']}")
    else:
        print(
            f"           measured {s['memory_measured_bytes'] / 2**20:.3f} MB "
            f"({s['memory_measured_what']})"
        )
    mach = s["machine"]
    print(f"  machine  {mach['cpu']}, {mach['usable_cores']} cores, fingerprint {s['fingerprint']}")
    if "latency_ratio_vs_compare" in s:
        print(f"  compare  {s['latency_ratio_vs_compare']:.3f}x the latency in {s['compare']}")
    if "out" in s:
        print(f"  wrote    {s['out']}")


def run_lut(cfg: DictConfig, log=print) -> dict:
    from metamorph.devices.validation import plot_validation, validate
    from metamorph.io.atomic import atomic_write_text
    from metamorph.models import list_models

    if str(cfg.arch) not in list_models():
        raise ValueError(f"unknown arch={cfg.arch}; registered: {', '.join(list_models())}")
    if int(cfg.n) < 2:
        raise ValueError(f"n={cfg.n}: validation needs at least 2 random shapes")
    profile = get_profile(str(cfg.device))
    if cfg.min_run_time is not None:
        profile.min_run_time = float(cfg.min_run_time)
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    log(
        f"[metamorph-profile] predictor for {profile.name}: validating on {cfg.n} {cfg.arch} shapes"
    )
    pred = LatencyPredictor(
        profile,
        cache_dir=cfg.cache_dir,
        log=log,
        rebuild=bool(cfg.rebuild),
        method=str(cfg.get("method", "isolated")),
    )
    r = validate(
        profile, str(cfg.arch), int(cfg.n), int(cfg.seed), bool(cfg.bn), log=log, predictor=pred
    )
    stem = out_dir / f"lut_{profile.name}_{cfg.arch}"
    png = plot_validation(r, stem.with_suffix(".png"))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(r, indent=1))
    s = {k: v for k, v in r.items() if k != "rows"}
    s.update(method=pred.method, png=str(png), json=str(stem.with_suffix(".json")))
    return s


def report_lut(s: dict) -> None:
    print(
        f"  {s['arch']} on {s['profile']}: MAPE {s['mape_pct']:.2f}%, Spearman {s['spearman']} "
        f"over {s['n']} random shapes; table of {s['entries']} entries at {s['table']}"
    )
    print(f"  wrote    {s['png']}\n  wrote    {s['json']}")


def run(cfg: DictConfig) -> dict:
    command = str(cfg.command)
    if command not in COMMANDS:
        raise ValueError(f"unknown command={command}; choose one of {', '.join(COMMANDS)}")
    return run_lut(cfg) if command == "lut" else run_measure(cfg)


@entry_point(
    "metamorph-profile",
    "profile",
    extra_errors=(ProfileError, DeviceUnavailable, MachineMismatch),
)
def _main(cfg: DictConfig) -> None:
    s = run(cfg)  # the user's errors: one line, exit status 2 (metamorph.cli.entry)
    (report_lut if str(cfg.command) == "lut" else report_measure)(s)
    print_summary(s)


def _argv(argv: list[str]) -> list[str]:
    """The first word picks the command; ``model=<file>`` is ``src=<file>`` (Hydra would take
    ``model=`` for the ``model`` config group)."""
    args = list(argv[1:])
    if args and args[0] in COMMANDS:
        args = [*args[1:], f"command={args[0]}"]
    args = ["src=" + a[len("model=") :] if a.startswith("model=") else a for a in args]
    return [argv[0], *args]


def main() -> None:
    """``metamorph-profile [measure|lut] key=value ...``."""
    sys.argv = _argv(sys.argv)
    _main()


if __name__ == "__main__":
    main()
