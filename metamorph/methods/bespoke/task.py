"""``metamorph-train task=bespoke_preprocess`` (the model house: segments, sampled alternatives,
cached teacher features, mimic training, latency table; resumable) and ``task=bespoke_retrain``
(distillation of the chosen student from the teacher; resumes from ``last.ckpt`` like every
task), and the retraining checkpoint kind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from metamorph.config.schema import typed
from metamorph.io.atomic import atomic_write_text
from metamorph.io.model_file import save_model
from metamorph.methods.bespoke.config import ALL_KINDS, PreprocessConfig, RetrainConfig
from metamorph.methods.bespoke.features import FeatureCache
from metamorph.methods.bespoke.house import (
    build_alternative,
    enumerate_segments,
    load_public,
    sample_house,
    write_house,
)
from metamorph.methods.bespoke.module import RETRAIN_KIND, RetrainModule
from metamorph.methods.bespoke.preprocess import measure_table, train_house
from metamorph.models.metrics import top1
from metamorph.models.resnet_cifar import CifarResNet
from metamorph.runtime.checkpoints import read_checkpoint, register_checkpoint_kind, submodule_state
from metamorph.runtime.data import build_datamodule
from metamorph.runtime.networks import load_any_model
from metamorph.runtime.summary import plain
from metamorph.runtime.tasks import register_task
from metamorph.runtime.trainer import build_trainer, fit_and_test
from metamorph.utils.profile import count_params


def _teacher(path: str | None, what: str) -> CifarResNet:
    if not path:
        raise ValueError(
            f"{what}= is required: the teacher model file (e.g. outputs/models/resnet56_ft.json)"
        )
    net = load_any_model(path)
    if not isinstance(net, CifarResNet):
        raise ValueError(f"{what}={path} is a {type(net).__name__}; Bespoke needs a CIFAR ResNet")
    return net.eval()


@register_task("bespoke_preprocess")
def run_preprocess(cfg: DictConfig) -> dict:
    """Build the house, cache the teacher's features, train and measure every alternative."""
    t0, c0 = time.time(), time.process_time()
    tc: PreprocessConfig = typed(PreprocessConfig, cfg.task, "task")
    hc, mc = tc.house, tc.mimic
    bad = [k for k in hc.kinds if k not in ALL_KINDS]
    if bad or not hc.kinds:
        raise ValueError(f"task.house.kinds={hc.kinds}: choose from {list(ALL_KINDS)}")
    from metamorph.devices.profiles import get_profile

    get_profile(tc.device)  # a typo fails before any work
    teacher = _teacher(tc.teacher, "task.teacher")
    public_names = list(hc.public) if "public_run" in hc.kinds else []
    public = load_public(public_names, hc.public_dir)
    out = Path(tc.out or cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    segments = enumerate_segments(teacher, hc.min_len, hc.max_len)
    specs = sample_house(
        teacher,
        public,
        segments,
        hc.per_segment,
        hc.max_segments,
        hc.kinds,
        hc.keep_ratios,
        hc.rank_ratios,
        hc.seed,
        hc.sample,
    )
    write_house(
        out / "house.json",
        {
            "teacher": str(Path(tc.teacher).resolve()),
            "public": public_names,
            "public_dir": None if hc.public_dir is None else str(Path(hc.public_dir).resolve()),
            "device": tc.device,
            "segments": len(segments),
            "config": OmegaConf.to_container(cfg.task, resolve=True),
        },
        specs,
    )
    print(
        f"[metamorph-train] task=bespoke_preprocess {len(segments)} segments, "
        f"{len(specs)} alternatives ({', '.join(hc.kinds)}) -> {out}"
    )
    dm = build_datamodule(cfg.data, seed=int(cfg.seed))
    dm.setup("fit")
    dm.set_normalization(teacher.arch.mean, teacher.arch.std)
    tf = time.time()
    train_cache = FeatureCache(out / "features" / "train")
    xs, ys = dm.subset("train", mc.images, seed=int(cfg.seed))
    train_cache.fill(teacher, dm.transform_batch(xs), ys)
    proxy_cache = FeatureCache(out / "features" / "proxy")
    xp, yp = dm.subset("val", mc.proxy_images, seed=int(cfg.seed))
    if len(yp) == 0:
        raise ValueError("the val split is empty: the search's proxy set needs data.val_size > 0")
    proxy_cache.fill(teacher, dm.transform_batch(xp), yp)
    features_s = time.time() - tf
    modules = {s.id: build_alternative(s, teacher, public) for s in specs}
    tt = time.time()
    results = train_house(
        out,
        specs,
        modules,
        train_cache,
        mc.epochs,
        mc.batch_size,
        mc.lr,
        mc.n_jobs,
        int(cfg.seed),
    )
    train_s = time.time() - tt
    tl = time.time()
    table = measure_table(out, teacher, specs, modules, tc.device, mc.latency_min_run_time)
    latency_s = time.time() - tl
    kinds = {k: sum(1 for s in specs if s.kind == k) for k in ALL_KINDS}
    summary = {
        "task": "bespoke_preprocess",
        "house": str(out),
        "segments": len(segments),
        "alternatives": len(specs),
        "by_kind": kinds,
        "trained_now": sum(1 for r in results.values() if not r["resumed"]),
        "resumed": sum(1 for r in results.values() if r["resumed"]),
        "train_images": int(len(ys)),
        "proxy_images": int(len(yp)),
        "teacher_proxy_acc": proxy_cache.info()["teacher_acc"],
        "declared_teacher_ms": round(
            table["stem_head"] + sum(table[f"block:{i}"] for i in range(len(teacher.blocks()))), 4
        ),
        "features_s": round(features_s, 1),
        "mimic_train_s": round(train_s, 1),
        "latency_table_s": round(latency_s, 1),
        "time_s": round(time.time() - t0, 1),
        "cpu_s_parent": round(time.process_time() - c0, 1),
    }
    atomic_write_text(out / "preprocess.json", json.dumps(summary, indent=1))
    return summary


def write_onnx(net, path: Path) -> str:
    """The student as ONNX (atomic: a failed export leaves no partial file)."""
    from metamorph.export.formats import export_onnx
    from metamorph.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        export_onnx(net, tmp)
    return str(path)


def _test_acc(net, dm) -> float:
    net = net.eval()
    with torch.no_grad():
        return round(top1(net, dm.normalized_batches("test")), 2)


@register_task("bespoke_retrain")
def run_retrain(cfg: DictConfig) -> dict:
    """Distil the chosen student from the teacher (KL at a temperature + CE)."""
    t0 = time.time()
    L.seed_everything(cfg.seed, workers=True)
    tc: RetrainConfig = typed(RetrainConfig, cfg.task, "task")
    if not tc.student:
        raise ValueError(
            "task.student= is required: the model file metamorph-customize method=bespoke wrote"
        )
    if not 0.0 <= tc.kd_weight <= 1.0 or tc.kd_temperature <= 0:
        raise ValueError("task.kd_weight must be in [0, 1] and task.kd_temperature > 0")
    student = load_any_model(tc.student)
    # plain fine-tuning (kd_weight 0) runs no teacher and needs none
    teacher = _teacher(tc.teacher, "task.teacher") if tc.kd_weight > 0 or tc.teacher else None
    dm = build_datamodule(cfg.data, seed=int(cfg.seed))
    dm.prepare_data()
    dm.setup("fit")
    dm.set_normalization(student.arch.mean, student.arch.std)
    out_dir = Path(cfg.paths.output_dir)
    summary: dict = {
        "task": "bespoke_retrain",
        "student": tc.student,
        "params": count_params(student),
        "output_dir": str(out_dir),
    }
    if tc.test_before and cfg.test:
        summary["test_acc_before"] = _test_acc(student, dm)
    module = RetrainModule(student.train(), teacher, tc, hparams={"config": plain(cfg)})
    trainer = build_trainer(cfg)
    print(
        f"[metamorph-train] task=bespoke_retrain params={summary['params']:,} "
        f"KD T={tc.kd_temperature} w={tc.kd_weight} -> {out_dir}"
    )
    fit_and_test(cfg, module, dm, summary, trainer=trainer)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        net = module.student.eval().cpu()
        meta = {
            "name": cfg.name,
            "bespoke": {
                "retrained_from": tc.student,
                "test_acc_before": summary.get("test_acc_before"),
                "test_acc": summary.get("test/acc"),
            },
        }
        target = Path(cfg.export_to) if cfg.export_to else out_dir / "student"
        target.parent.mkdir(parents=True, exist_ok=True)
        summary["model_file"] = str(save_model(net, target, meta=meta))
        if tc.onnx:
            summary["onnx"] = write_onnx(net, target.with_name(target.name + ".onnx"))
    summary["time_s"] = round(time.time() - t0, 1)
    return summary


@register_checkpoint_kind(RETRAIN_KIND)
def load_retrain_checkpoint(path, map_location: str = "cpu") -> CifarResNet:
    """The student of a ``task=bespoke_retrain`` Lightning checkpoint (``weights_only``): its
    architecture is the student model file's, named in the checkpoint's config."""
    ckpt = read_checkpoint(path, map_location)
    student_file = ckpt["hyper_parameters"]["config"]["task"]["student"]
    net = load_any_model(student_file)
    state = submodule_state(ckpt, "student.")
    net.load_state_dict(state)
    return net.eval()
