"""``metamorph-sample``: a standalone network from a metamorphic checkpoint.

The target is a compression ratio (``gamma=``), an explicit shape (``hidden=``) or a budget
(``budget.max_params`` / ``max_flops`` / ``max_latency_ms``: the most accurate candidate within
it). The weights are the evaluation emission (EMA INR, K-sample averaged); the network is written
as ``<out>.safetensors`` + ``<out>.json`` (loadable with ``metamorph.load``), plus ``<out>.onnx``
(checked against PyTorch with onnxruntime) for ``format=onnx`` or ``<out>.pt2`` (a
``torch.export`` program) for ``format=export``. Nothing is written unless everything succeeded.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metamorph.cli.entry import USER_ERRORS, entry_point
from metamorph.devices import get_profile, list_profiles, measure_model
from metamorph.devices.budget import LIMITS
from metamorph.export.formats import (
    FORMATS,
    check_onnx,
    check_program,
    export_onnx,
    export_program,
    input_spec,
)
from metamorph.export.outputs import StagedOutputs, check_output_dir
from metamorph.export.plots import ratio_text
from metamorph.export.sample import (
    Budget,
    calibration_images,
    candidate_shapes,
    load_metamorphic,
    materialize,
    select_for_budget,
    shape_for_target,
    use_bn_images,
    val_batches,
)
from metamorph.hypernet.evaluate import batch_accuracy, is_seen
from metamorph.io.model_file import save_model
from metamorph.runtime.data import build_datamodule
from metamorph.runtime.device import resolve_device
from metamorph.runtime.summary import print_summary
from metamorph.utils.profile import count_flops, count_params

__all__ = ["USER_ERRORS", "main", "report", "run"]


def _out_prefix(out) -> Path:
    if out is None or str(out).strip() == "":
        raise ValueError("out= is required: the output path prefix (<out>.safetensors, <out>.json)")
    p = Path(str(out))
    if p.suffix in (".json", ".safetensors", ".onnx", ".pt2"):
        p = p.with_suffix("")
    if p.name in ("", ".", ".."):
        raise ValueError(f"out={out} needs a file name prefix, e.g. out=outputs/models/r20_g05")
    return p.absolute()


def _device_profile(cfg: DictConfig) -> str | None:
    """``device=`` names a device profile (metamorph.devices); the torch device that evaluates
    budget candidates is ``eval_device=``."""
    name = cfg.get("device")
    if name is None:
        return None
    if str(name) in ("cpu", "cuda", "auto"):
        raise ValueError(
            f"device={name}: device= names a device profile to measure on "
            f"({', '.join(list_profiles())}); the device that evaluates budget candidates is "
            f"eval_device={name}"
        )
    return get_profile(str(name)).name if not str(name).endswith((".yaml", ".yml")) else str(name)


def _measured_record(m) -> dict:
    """What the summary and the model file keep of an end-to-end measurement."""
    return {
        "device": m.profile["name"],
        "latency_ms": round(m.latency_ms, 4),
        "latency_iqr_ms": round(m.latency.iqr_ms, 4),
        "memory_mb": round(m.memory_mb, 4),
        "memory_what": "analytic (params + activation peak)"
        if m.measured_memory_bytes is None
        else m.measured_memory_what,
        "cpu": m.machine["cpu"],
        "fingerprint": m.fingerprint,
        "measured_in": m.extra.get("measured_in", "this process"),
        **(
            {"process_medians_ms": m.extra["process_medians_ms"]}
            if "process_medians_ms" in m.extra
            else {}
        ),
    }


def _target(cfg: DictConfig) -> str:
    b = cfg.budget
    budget_set = any(b.get(k) is not None for k in LIMITS)
    given = [
        name
        for name, on in (
            ("gamma", cfg.gamma is not None),
            ("hidden", cfg.hidden is not None),
            ("budget", budget_set),
        )
        if on
    ]
    if len(given) != 1:
        raise ValueError(
            "give exactly one target: gamma=<ratio in [0,1)>, hidden=<[[w,...],...]> or a "
            "budget (budget.max_params / max_flops / max_latency_ms / max_memory_mb); "
            f"got {given or 'none'}"
        )
    return given[0]


def _accuracy_split(cfg: DictConfig, data_loaded: bool, data_given: bool) -> str | None:
    """The split the sampled network is scored on: ``accuracy_split`` (auto: test, when data
    is loaded anyway or named on the command line)."""
    v = cfg.get("accuracy_split", "auto")
    if v in (None, "none", "null", False):
        return None
    if v == "auto":
        return "test" if data_loaded or data_given else None
    if v not in ("train", "val", "test"):
        raise ValueError(f"accuracy_split={v}: choose auto, test, val, train or null")
    return str(v)


def run(cfg: DictConfig, log=print, data_given: bool = False) -> dict:
    """Sample, export and check one network; ``data_given``: data= or data.* was set on the
    command line (the sampled network is then scored on the test split)."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format={fmt}; choose one of {', '.join(FORMATS)}")
    target = _target(cfg)
    if cfg.depth is not None and target != "gamma":
        raise ValueError("depth= applies only with gamma=; give explicit widths with hidden=")
    out = _out_prefix(cfg.out)
    check_output_dir(out.parent)  # fail before any expensive work
    budget = None
    profile = _device_profile(cfg)
    if target == "budget":
        b = OmegaConf.to_container(cfg.budget, resolve=True)
        budget = Budget.from_dict({**b, "device": profile})
    module = load_metamorphic(cfg.ckpt)
    net = module.net
    k = module.cfg.eval_k if cfg.k is None else int(cfg.k)
    if k < 1:
        raise ValueError(f"k={cfg.k} must be at least 1 (the number of averaged emissions)")
    seed = int(cfg.seed)
    summary: dict = {"ckpt": str(cfg.ckpt), "target": target, "k": k, "format": fmt}
    chosen = None
    n_calib = int(cfg.get("calibrate") or 0)
    n_bn = int(cfg.get("bn_images") or 0)
    dm = None
    if target == "budget" or n_calib or n_bn:
        dm = build_datamodule(
            cfg.data, mean=net.base_arch.mean, std=net.base_arch.std, seed=int(cfg.seed)
        )
        dm.setup("fit")
        if dm.num_classes != net.base_arch.num_classes:
            raise ValueError(
                f"the checkpoint has {net.base_arch.num_classes} classes but {cfg.data.name} "
                f"has {dm.num_classes}"
            )
    n_bn = use_bn_images(net, dm, n_bn, seed) if n_bn else 0
    net.bn_augment = bool(cfg.get("bn_augment", True))
    if target == "budget":
        device = resolve_device(str(cfg.eval_device))
        module.to(device)
        batches = val_batches(dm, str(cfg.split), cfg.val_subset, seed=seed, device=device)
        n_images = sum(len(y) for _, y in batches)
        s = cfg.search
        cands = candidate_shapes(
            net, float(s.gamma_step), float(s.max_gamma), int(s.random_shapes), int(s.seed)
        )
        log(f"[metamorph-sample] budget: {budget.describe()}")
        log(f"  {len(cands)} candidate shapes (uniform ratios, depths, non-uniform, smallest)")
        chosen, cands = select_for_budget(module, cands, budget, batches, k=k, seed=seed, log=log)
        module.cpu()
        within = [c for c in cands if c.within_budget]
        over = [c for c in cands if any(f.startswith("measured_") for f in c.fails)]
        log(
            f"  {len(within)} of {len(cands)} met the budget; ranked by {cfg.split} accuracy on "
            f"{n_images} images (EMA, K={k})"
            + (f"; {len(over)} more measured over budget end to end" if over else "")
        )
        ranked = sorted(within, key=lambda c: (-c.acc, c.flops, c.params))
        log("  rank | shape        | acc (%) | params     | MFLOPs  | predicted ms | measured ms")
        for i, c in enumerate(ranked[:5]):
            pred = "-" if c.predicted_latency_ms is None else f"{c.predicted_latency_ms:.3f}"
            meas = "-" if c.measured is None else f"{c.measured.latency_ms:.3f}"
            log(
                f"  {i + 1:>4} | {c.label:<12} | {c.acc:7.2f} | {c.params:>10,} | "
                f"{c.flops / 1e6:7.2f} | {pred:>12} | {meas:>11}"
            )
        hidden = chosen.hidden
        why = (
            f"most accurate of the {len(within)} shapes within the budget "
            f"({chosen.acc:.2f}% on {n_images} {cfg.split} images"
        )
        if len(ranked) > 1:
            why += f"; runner-up {ranked[1].label} {ranked[1].acc:.2f}%"
        why += ")"
        summary.update(
            {
                "budget": budget.to_dict(),
                "chosen": chosen.label,
                "val_acc": chosen.acc,
                "val_images": n_images,
                "candidates": len(cands),
                "met_budget": len(within),
                "measured_over_budget": [c.label for c in over],
                "why": why,
            }
        )
        if chosen.predicted_latency_ms is not None:
            summary["predicted_latency_ms"] = round(chosen.predicted_latency_ms, 4)
        if chosen.memory_mb is not None:
            summary["memory_mb_analytic"] = round(chosen.memory_mb, 4)
        if chosen.measured is not None:
            summary["measured"] = _measured_record(chosen.measured)
    else:
        hidden = shape_for_target(
            net,
            gamma=cfg.gamma if target == "gamma" else None,
            hidden=cfg.hidden if target == "hidden" else None,
            depth=OmegaConf.to_container(cfg.depth)
            if OmegaConf.is_config(cfg.depth)
            else cfg.depth,
        )

    calib = calibration_images(dm, n_calib, seed) if n_calib else None
    model = materialize(module, hidden, k=k, seed=seed, calibrate_images=calib)
    params, flops = count_params(model), count_flops(model)
    acc_split = _accuracy_split(cfg, dm is not None, data_given)
    if acc_split is not None:  # the network as written, calibration included
        if dm is None:
            dm = build_datamodule(
                cfg.data, mean=net.base_arch.mean, std=net.base_arch.std, seed=int(cfg.seed)
            )
            dm.setup("fit" if acc_split != "test" else "test")
        xs, ys = dm.split_tensors(acc_split)
        acc = batch_accuracy(model.eval(), dm.normalized_batches((xs, ys)))
        summary["accuracy"] = {
            "acc": round(acc, 3),
            "split": acc_split,
            "data": str(cfg.data.name),
            "images": len(ys),
        }
        log(f"  scored the sampled network on {cfg.data.name}/{acc_split}: {acc:.2f}%")
    if profile is not None and chosen is None:  # a gamma / hidden target measured on device=
        summary["measured"] = _measured_record(measure_model(model, profile))
    gamma = net.gamma_of(hidden)
    seen = is_seen(net, hidden)
    meta = {
        "source": "metamorph-sample",
        "checkpoint": str(Path(str(cfg.ckpt)).absolute()),
        "shape": hidden,
        "gamma": round(gamma, 6),
        "k": k,
        "seed": seed,
        "seen": seen,
        "ema": module.ema is not None,
        "target": target,
        "calibrated_on": 0 if calib is None else len(calib),
        "bn_statistics_images": (n_bn or len(net.bn_calib)) if net.base_arch.bn_blocks else 0,
        "bn_statistics_augmented": bool(net.base_arch.bn_blocks and net.bn_augment),
    }
    if target == "gamma":
        meta["requested_gamma"] = float(cfg.gamma)
    if chosen is not None:
        meta.update(
            budget=summary["budget"],
            val_acc=chosen.acc,
            val_images=summary["val_images"],
            chosen=chosen.label,
        )
        if "predicted_latency_ms" in summary:
            meta["predicted_latency_ms"] = summary["predicted_latency_ms"]
    if "measured" in summary:
        meta["measured"] = summary["measured"]
    nig = bool(cfg.export.normalize_in_graph)
    if fmt != "safetensors":
        meta["input"] = input_spec(model, nig)  # what the .onnx / .pt2 graph takes
    files: dict[str, str] = {}
    with StagedOutputs(out.parent) as st:
        save_model(model, st.path(out.name), meta=meta)
        if fmt == "onnx":
            onnx_path = st.path(out.name + ".onnx")
            exporter = export_onnx(
                model,
                onnx_path,
                opset=int(cfg.onnx.opset),
                exporter=str(cfg.onnx.exporter),
                normalize_in_graph=nig,
                metadata={"metamorph_shape": hidden, "metamorph_gamma": round(gamma, 6)},
            )
            diff = check_onnx(
                onnx_path, model, batch=int(cfg.onnx.batch), seed=seed, normalize_in_graph=nig
            )
            summary["onnx_exporter"] = exporter
            summary["onnx_max_abs_diff"] = diff
            if not diff <= float(cfg.onnx.atol):
                raise ValueError(
                    f"the ONNX export's logits differ from PyTorch's by {diff:.3g} "
                    f"> onnx.atol={cfg.onnx.atol}; nothing was written"
                )
        elif fmt == "export":
            pt2 = st.path(out.name + ".pt2")
            export_program(model, pt2, normalize_in_graph=nig)
            diff = check_program(
                pt2, model, batch=int(cfg.onnx.batch), seed=seed, normalize_in_graph=nig
            )
            summary["export_max_abs_diff"] = diff
            if not diff <= float(cfg.onnx.atol):
                raise ValueError(
                    f"the reloaded torch.export program differs from the model by {diff:.3g}; "
                    "nothing was written"
                )
        for p in st.commit():
            files[p.suffix.lstrip(".")] = str(p)
    if fmt != "safetensors":
        summary["input"] = (
            "[0, 1] RGB images, NCHW float32 (normalisation inside the graph)"
            if nig
            else "normalised images ((pixel/255 - mean) / std, see the JSON's meta.input)"
        )
    summary.update(
        {
            "hidden": hidden,
            "gamma": round(gamma, 4),
            "seen": seen,
            "depth": model.arch.depth,
            "params": params,
            "flops": flops,
            "model": files["json"],
            "files": sorted(files.values()),
            "time_s": round(time.time() - t0, 2),
        }
    )
    return summary


def report(s: dict) -> None:
    print(
        f"[metamorph-sample] {s['ckpt']} -> {s['model']} "
        f"(ResNet-{s['depth']}, {ratio_text(s['gamma'])}, {'seen' if s['seen'] else 'unseen'}, "
        f"K={s['k']})"
    )
    print(f"  shape   {s['hidden']}")
    print(f"  cost    {s['params']:,} params, {s['flops'] / 1e6:.2f} MFLOPs")
    if "accuracy" in s:
        a = s["accuracy"]
        print(f"  acc     {a['acc']:.2f}% on {a['data']}/{a['split']} ({a['images']:,} images)")
    if s["target"] == "budget":
        print(
            f"  chosen  {s['chosen']}: {s['why']}; {s['candidates']} candidates considered, "
            f"{s['met_budget']} met the budget"
        )
    m = s.get("measured")
    if m is not None:
        pred = s.get("predicted_latency_ms")
        pred = "" if pred is None else f" (predicted {pred:.3f} ms)"
        print(
            f"  device  {m['device']}: measured {m['latency_ms']:.3f} ms (IQR {m['latency_iqr_ms']:.3f})"
            f"{pred}, memory {m['memory_mb']:.2f} MB [{m['memory_what']}]"
        )
        notes = [f"measured in a {m['measured_in']}"] if "fresh" in m["measured_in"] else []
        if len(m.get("process_medians_ms", [])) > 1:
            notes.append("per process " + ", ".join(f"{v:.3f}" for v in m["process_medians_ms"]))
        b = s.get("budget") or {}
        if b.get("accepted_latency_ms") is not None:
            notes.append(
                f"accepted at <= {b['accepted_latency_ms']:.4g} ms (budget "
                f"{b['max_latency_ms']:g} ms less its {100 * b['latency_margin']:g}% margin)"
            )
        if notes:
            print("          " + "; ".join(notes))
    if "onnx_max_abs_diff" in s:
        print(
            f"  onnx    max |logit diff| vs PyTorch {s['onnx_max_abs_diff']:.3g} "
            f"(onnxruntime, {s['onnx_exporter']} exporter)"
        )
    if "input" in s:
        print(f"  input   {s['input']}")
    if "export_max_abs_diff" in s:
        print(f"  export  torch.export program reloaded, max |diff| {s['export_max_abs_diff']:.3g}")
    for f in s["files"]:
        print(f"  wrote   {f}")


@entry_point("metamorph-sample", "sample")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    given = HydraConfig.get().overrides.task
    data_given = any(o.lstrip("+~").split("=")[0].split(".")[0] == "data" for o in given)
    s = run(cfg, data_given=data_given)  # the user's errors: one line, exit 2 (cli.entry)
    report(s)
    print_summary(s)


if __name__ == "__main__":
    main()
