"""``metamorph-eval``: accuracy, parameters, FLOPs and CPU latency of a model on a data split.

Every source is read by its registered checkpoint kind and evaluated as a sub-network family
(:mod:`metamorph.models.subnet`). A family of many members (a metamorphic checkpoint of
``task=metamorph``, a slimmable one of ``task=slimmable``) is swept over compression ratios,
writing ``sweep.csv``, ``sweep.md`` and plots of accuracy, parameters, FLOPs and CPU latency vs
gamma to ``out_dir`` (see :mod:`metamorph.export.sweep`); a single network (a model file, a
GeneCAI-searched low-rank one included, an akamaster ``.th``, a ``task=pretrain`` checkpoint) is
scored once.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from metamorph.cli.entry import entry_point
from metamorph.devices.measure import cpu_latency_ms
from metamorph.export.plots import count, sweep_title
from metamorph.models.metrics import count_correct
from metamorph.models.subnet import SingleNetwork
from metamorph.runtime.checkpoints import checkpoint_kind, load_checkpoint
from metamorph.runtime.data import build_datamodule
from metamorph.runtime.device import resolve_device
from metamorph.runtime.summary import print_summary


@torch.no_grad()
def accuracy(model: nn.Module, dm, split: str, device: torch.device) -> tuple[float, int]:
    model = model.to(device).eval()
    correct, total = count_correct(model, dm.normalized_batches(split, device=device))
    return correct / max(1, total), total


def is_metamorphic_checkpoint(path: str | Path) -> bool:
    """``src`` is a metamorphic checkpoint (its registered kind); unreadable files are not, and
    are reported by the loader proper."""
    try:
        return checkpoint_kind(path) == "metamorph"
    except (ValueError, FileNotFoundError):
        return False


def is_family_source(source) -> bool:
    """A loaded source with many members to sweep (it names its own sub-network family)."""
    return hasattr(source, "subnet_family")


def run_metamorphic(cfg: DictConfig, log=print, source=None) -> dict:
    """Sweep a sub-network family checkpoint (metamorphic, slimmable: any source that names its
    :meth:`subnet_family`) over ``sweep.gammas`` / ``sweep.depths`` on ``split``."""
    from metamorph.export.outputs import StagedOutputs, check_output_dir
    from metamorph.export.sample import calibration_images, load_metamorphic, use_bn_images
    from metamorph.export.sweep import read_baselines, run_sweep, trained_gamma_range, write_outputs

    t0 = time.time()
    sw = cfg.sweep
    baselines = read_baselines(list(cfg.get("baselines") or []))
    out_dir = Path(str(cfg.out_dir))
    check_output_dir(out_dir)
    module = load_metamorphic(cfg.src) if source is None else source
    family = module.subnet_family()
    metamorphic = hasattr(module, "emit_eval")
    arch = family.base_arch
    dm = build_datamodule(cfg.data, mean=arch.mean, std=arch.std, seed=cfg.seed)
    n_calib = int(sw.get("calibrate") or 0)
    n_bn = int(sw.get("bn_images") or 0)
    quick = cfg.split == "test" and n_calib == 0 and n_bn == 0 and metamorphic
    dm.setup("test" if quick else "fit")
    if dm.num_classes != arch.num_classes:
        raise ValueError(
            f"model has {arch.num_classes} classes but {cfg.data.name} has {dm.num_classes}"
        )
    if not metamorphic:
        for key, n in (("calibrate", n_calib), ("bn_images", n_bn), ("k", sw.k or 0)):
            if n:
                raise ValueError(
                    f"sweep.{key}={n} applies to metamorphic checkpoints only; {cfg.src} is a "
                    f"{family.family_name} one (drop sweep.{key})"
                )
    calib = calibration_images(dm, n_calib, int(cfg.seed))
    bn_augment = bool(sw.get("bn_augment", True))
    if metamorphic:
        net = module.net
        n_bn = use_bn_images(net, dm, n_bn, int(cfg.seed))
        net.bn_augment = bn_augment
        k = module.cfg.eval_k if sw.k is None else int(sw.k)
        if k < 1:
            raise ValueError(f"sweep.k={sw.k} must be at least 1")
    else:  # the statistics of recalibrated widths: crop+flip augmented as in training
        module.cfg.calib_augment = bn_augment
        k = None
    device = resolve_device(cfg.device)
    module.to(device)
    x, y = dm.split_tensors(cfg.split)
    if sw.max_images is not None:
        x, y = dm.subset(cfg.split, int(sw.max_images), seed=cfg.seed)
    batches = list(dm.normalized_batches((x, y), device=device))
    what = f"blocks {family.meta_blocks}" if metamorphic else f"blocks {family.blocks}"
    how = f"EMA, K={k}" if metamorphic else "BN statistics recalibrated per width"
    log(
        f"[metamorph-eval] {family.family_name} checkpoint {cfg.src}: {what}, "
        f"{cfg.data.name}/{cfg.split} ({len(y)} images), {how}"
    )
    recalibrate = bool(sw.get("recalibrate", False))
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
        recalibrate=recalibrate,
        data=dm,
    )
    trained = trained_gamma_range(family)
    aug = "crop+flip augmented" if bn_augment else "not augmented"
    if metamorphic:
        cal = (
            "" if calib is None else f"; channel statistics calibrated on {len(calib)} train images"
        )
        if arch.bn_blocks:
            cal += f"; BN statistics of each shape on {n_bn} train images ({aug})"
        how = f"EMA INR, K={k}{cal}"
    else:
        n = module.cfg.calib_batches
        redo = "every width" if recalibrate else "widths without stored statistics"
        how = f"BN statistics of {redo} recalibrated on {n} train batches ({aug})"
    n_threads = int(cfg.latency_threads or torch.get_num_threads())
    span = "" if trained is None else f"; trained ratios gamma in [{trained[0]:g}, {trained[1]:g}]"
    header = (
        f"Sweep of `{cfg.src}` on {cfg.data.name}/{cfg.split} ({len(y)} images; {how}{span}; "
        f"latency: batch {sw.latency_batch_size}, {count(n_threads, 'thread')}; "
        "median, IQR in brackets)"
    )
    with StagedOutputs(out_dir) as st:
        write_outputs(
            rows,
            st.path(""),
            trained,
            baselines,
            header=header,
            title=sweep_title(cfg.src, cfg.data.name, cfg.split, len(y), k)
            if metamorphic
            else sweep_title(cfg.src, cfg.data.name, cfg.split, len(y), None),
        )
        files = [str(p) for p in st.commit()]
    points = [r.to_dict() for r in rows]
    full = next((r for r in rows if r.gamma == 0.0 and r.label.startswith("g")), rows[0])
    return {
        "src": str(cfg.src),
        "kind": family.family_name,
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


def load_source(src):
    """The object ``src`` holds, by its registered checkpoint kind (any kind)."""
    check_src(src)
    return load_checkpoint(src)


def run(cfg: DictConfig, source=None) -> dict:
    source = load_source(cfg.src) if source is None else source
    if is_family_source(source):
        return run_metamorphic(cfg, source=source)
    if isinstance(source, L.LightningModule) or not isinstance(source, nn.Module):
        raise ValueError(
            f"{cfg.src} is a {checkpoint_kind(cfg.src)} checkpoint that metamorph-eval cannot "
            "score: give a model file (.json), an akamaster .th, a task=pretrain, metamorphic "
            "or slimmable checkpoint"
        )
    t0 = time.time()
    family = SingleNetwork(source.eval())
    model = family.materialize("full")
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
        **family.costs("full"),
    }
    if cfg.latency:
        for bs in cfg.latency_batch_sizes:
            summary[f"latency_ms_bs{bs}"] = round(cpu_latency_ms(model, bs, cfg.latency_threads), 3)
    summary["time_s"] = round(time.time() - t0, 1)
    return summary


@entry_point("metamorph-eval", "eval", tee_log=True)
def main(cfg: DictConfig) -> None:
    source = load_source(cfg.src)
    if is_family_source(source):
        s = run_metamorphic(cfg, source=source)  # user errors: one line, exit 2 (cli.entry)
        md = Path(next(f for f in s["files"] if f.endswith("sweep.md")))
        print(md.read_text())
        print(f"  wrote {len(s['files'])} files to {s['out_dir']}")
        print_summary(s)
        return
    s = run(cfg, source=source)
    print(f"[metamorph-eval] {s['src']} on {cfg.data.name}/{s['split']} ({s['images']} images)")
    print(f"  accuracy {s['acc']:.2f}%  params {s['params']:,}  FLOPs {s['flops'] / 1e6:.1f} M")
    for k, v in s.items():
        if k.startswith("latency"):
            print(f"  {k} {v}")
    print_summary(s)


if __name__ == "__main__":
    main()
