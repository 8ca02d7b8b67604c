"""``metamorph-eval``: accuracy, parameters, FLOPs and CPU latency of a model on a data split.

Given a metamorphic checkpoint (``task=metamorph``), it sweeps compression ratios instead and
writes ``sweep.csv``, ``sweep.md`` and plots of accuracy, parameters, FLOPs and CPU latency vs
gamma to ``out_dir`` (see :mod:`metamorph.export.sweep`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from metamorph.cli.entry import entry_point
from metamorph.devices.measure import cpu_latency_ms
from metamorph.export.plots import count, sweep_title
from metamorph.runtime.checkpoints import checkpoint_kind
from metamorph.runtime.data import build_datamodule
from metamorph.runtime.device import resolve_device
from metamorph.runtime.networks import load_any_model
from metamorph.runtime.summary import print_summary
from metamorph.utils.profile import count_flops, count_params


@torch.no_grad()
def accuracy(model: nn.Module, dm, split: str, device: torch.device) -> tuple[float, int]:
    model = model.to(device).eval()
    correct = total = 0
    for x, y in dm.normalized_batches(split, device=device):
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    return correct / max(1, total), total


def is_metamorphic_checkpoint(path: str | Path) -> bool:
    """``src`` is a metamorphic checkpoint (its registered kind); unreadable files are not, and
    are reported by the loader proper."""
    try:
        return checkpoint_kind(path) == "metamorph"
    except (ValueError, FileNotFoundError):
        return False


def run_metamorphic(cfg: DictConfig, log=print) -> dict:
    """Sweep a metamorphic checkpoint over ``sweep.gammas`` / ``sweep.depths`` on ``split``."""
    from metamorph.export.outputs import StagedOutputs, check_output_dir
    from metamorph.export.sample import calibration_images, load_metamorphic, use_bn_images
    from metamorph.export.sweep import read_baselines, run_sweep, trained_gamma_range, write_outputs

    t0 = time.time()
    sw = cfg.sweep
    baselines = read_baselines(list(cfg.get("baselines") or []))
    out_dir = Path(str(cfg.out_dir))
    check_output_dir(out_dir)
    module = load_metamorphic(cfg.src)
    net = module.net
    arch = net.base_arch
    dm = build_datamodule(cfg.data, mean=arch.mean, std=arch.std, seed=cfg.seed)
    n_calib = int(sw.get("calibrate") or 0)
    n_bn = int(sw.get("bn_images") or 0)
    dm.setup("test" if cfg.split == "test" and n_calib == 0 and n_bn == 0 else "fit")
    if dm.num_classes != arch.num_classes:
        raise ValueError(
            f"model has {arch.num_classes} classes but {cfg.data.name} has {dm.num_classes}"
        )
    calib = calibration_images(dm, n_calib, int(cfg.seed))
    n_bn = use_bn_images(net, dm, n_bn, int(cfg.seed))
    net.bn_augment = bool(sw.get("bn_augment", True))
    device = resolve_device(cfg.device)
    module.to(device)
    x, y = dm.split_tensors(cfg.split)
    if sw.max_images is not None:
        x, y = dm.subset(cfg.split, int(sw.max_images), seed=cfg.seed)
    batches = list(dm.normalized_batches((x, y), device=device))
    k = module.cfg.eval_k if sw.k is None else int(sw.k)
    if k < 1:
        raise ValueError(f"sweep.k={sw.k} must be at least 1")
    log(
        f"[metamorph-eval] metamorphic checkpoint {cfg.src}: blocks {net.meta_blocks}, "
        f"{cfg.data.name}/{cfg.split} ({len(y)} images), EMA, K={k}"
    )
    rows = run_sweep(
        module,
        batches,
        gammas=list(sw.gammas),
        depths=list(sw.depths),
        n_random=int(sw.random_shapes),
        widths_above=list(sw.get("widths_above") or []),
        k=k,
        seed=int(cfg.seed),
        latency=bool(cfg.latency),
        latency_batch_size=int(sw.latency_batch_size),
        latency_threads=cfg.latency_threads,
        latency_min_run_time=float(sw.latency_min_run_time),
        log=log,
        calibrate_images=calib,
    )
    trained = trained_gamma_range(net)
    cal = "" if calib is None else f"; channel statistics calibrated on {len(calib)} train images"
    if net.base_arch.bn_blocks:
        aug = "crop+flip augmented" if net.bn_augment else "not augmented"
        cal += f"; BN statistics of each shape on {n_bn} train images ({aug})"
    n_threads = int(cfg.latency_threads or torch.get_num_threads())
    header = (
        f"Sweep of `{cfg.src}` on {cfg.data.name}/{cfg.split} ({len(y)} images; EMA INR, "
        f"K={k}{cal}; trained ratios gamma in [{trained[0]:g}, {trained[1]:g}]; latency: batch "
        f"{sw.latency_batch_size}, {count(n_threads, 'thread')}; median, IQR in brackets)"
    )
    with StagedOutputs(out_dir) as st:
        write_outputs(
            rows,
            st.path(""),
            trained,
            baselines,
            header=header,
            title=sweep_title(cfg.src, cfg.data.name, cfg.split, len(y), k),
        )
        files = [str(p) for p in st.commit()]
    points = [r.to_dict() for r in rows]
    full = next((r for r in rows if r.gamma == 0.0 and r.label.startswith("g")), rows[0])
    return {
        "src": str(cfg.src),
        "kind": "metamorphic",
        "split": cfg.split,
        "images": len(y),
        "k": k,
        "acc": round(full.acc, 3),
        "params": full.params,
        "flops": full.flops,
        "points": points,
        "baselines": [b.name for b in baselines],
        "out_dir": str(out_dir.absolute()),
        "files": sorted(files),
        "time_s": round(time.time() - t0, 1),
    }


def check_src(src) -> Path:
    """``src`` must be one existing file; a folder is answered with the files in it to pick."""
    p = Path(str(src))
    if p.is_dir():
        found = sorted(str(f) for pat in ("*.ckpt", "*.json", "*.th") for f in p.glob(pat))[:8]
        hint = f"; files there: {', '.join(found)}" if found else ""
        raise ValueError(
            f"src={src} is a directory; give one file: a model file (.json), an akamaster .th, "
            f"a task=pretrain .ckpt or a metamorphic checkpoint (metamorph.ckpt){hint}"
        )
    if not p.exists():
        raise FileNotFoundError(f"src={src} not found; give a model file (.json), .th or .ckpt")
    return p


def run(cfg: DictConfig) -> dict:
    check_src(cfg.src)
    if is_metamorphic_checkpoint(cfg.src):
        return run_metamorphic(cfg)
    t0 = time.time()
    model = load_any_model(cfg.src).eval()
    dm = build_datamodule(cfg.data, mean=model.arch.mean, std=model.arch.std, seed=cfg.seed)
    dm.setup("test" if cfg.split == "test" else "fit")
    if dm.num_classes != model.arch.num_classes:
        raise ValueError(
            f"model has {model.arch.num_classes} classes but {cfg.data.name} has {dm.num_classes}"
        )
    device = resolve_device(cfg.device)
    acc, n = accuracy(model, dm, cfg.split, device)
    model = model.cpu()
    summary = {
        "src": str(cfg.src),
        "split": cfg.split,
        "images": n,
        "acc": round(100 * acc, 3),
        "params": count_params(model),
        "flops": count_flops(model),
    }
    if cfg.latency:
        for bs in cfg.latency_batch_sizes:
            summary[f"latency_ms_bs{bs}"] = round(cpu_latency_ms(model, bs, cfg.latency_threads), 3)
    summary["time_s"] = round(time.time() - t0, 1)
    return summary


@entry_point("metamorph-eval", "eval", tee_log=True)
def main(cfg: DictConfig) -> None:
    check_src(cfg.src)
    if is_metamorphic_checkpoint(cfg.src):
        s = run_metamorphic(cfg)  # the user's errors: one line, exit 2 (metamorph.cli.entry)
        md = Path(next(f for f in s["files"] if f.endswith("sweep.md")))
        print(md.read_text())
        print(f"  wrote {len(s['files'])} files to {s['out_dir']}")
        print_summary(s)
        return
    s = run(cfg)
    print(f"[metamorph-eval] {s['src']} on {cfg.data.name}/{s['split']} ({s['images']} images)")
    print(f"  accuracy {s['acc']:.2f}%  params {s['params']:,}  FLOPs {s['flops'] / 1e6:.1f} M")
    for k, v in s.items():
        if k.startswith("latency"):
            print(f"  {k} {v}")
    print_summary(s)


if __name__ == "__main__":
    main()
