"""The Hydra entry points: metamorph-train, metamorph-eval and metamorph-convert, in process (via
``hydra.compose`` and each module's ``run``) and as console scripts. Tiny data throughout."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    QUIET,
    TINY_DATA,
    compose_config,
    last_json_line,
    run_script,
    script_cmd,
    subprocess_env,
)
from hydra.errors import ConfigCompositionException
from torch import nn

import metamorph
from metamorph.cli import convert, evaluate, train
from metamorph.models import IMAGENET_MEAN, IMAGENET_STD
from metamorph.runtime.checkpoint_io import AtomicCheckpointIO
from metamorph.utils.profile import count_params

SHORT = [
    *TINY_DATA,
    *QUIET,
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
]


def _ckpts(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.ckpt"))


def _analytic_flops(model: nn.Module) -> int:
    """2 x multiply-adds of every conv and linear layer for one 32x32 image."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            total += 2 * out[0].numel() * k
        elif isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return total


# ----------------------------------------------------------------------------------------------
# metamorph-train, in process
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One short real run (1 epoch of 3 batches), shared by the tests that inspect its output."""
    out = tmp_path_factory.mktemp("short_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAMORPH_SHARED", str(out / "no-shared"))
        cfg = compose_config("train", out, SHORT)
        summary = train.run(cfg)
    return out, summary


def test_fdr_returns_summary(compose_cfg, tmp_path):
    cfg = compose_cfg("train", tmp_path, [*TINY_DATA, *QUIET, "debug=fdr"])
    assert cfg.trainer.fast_dev_run is True
    s = train.run(cfg)
    assert s["task"] == "pretrain" and s["model"] == "resnet20"
    assert s["global_step"] == 1
    assert 0.0 <= s["val/acc"] <= 1.0 and 0.0 <= s["test/acc"] <= 1.0
    assert "model_file" not in s  # fast_dev_run writes no model
    assert not (tmp_path / "model.json").exists()


def test_short_run_writes_checkpoints_and_model(short_run):
    out, s = short_run
    assert s["global_step"] == 3
    assert 0.0 <= s["val/acc"] <= 1.0 and 0.0 <= s["test/acc"] <= 1.0
    assert s["output_dir"] == str(out)
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ckpts = _ckpts(out)
    assert last in ckpts and len(ckpts) >= 2  # last + best
    for p in ckpts:
        ck = torch.load(p, map_location="cpu", weights_only=True)
        assert ck["global_step"] == 3
        assert ck["hyper_parameters"]["config"]["model"]["name"] == "resnet20"
        assert all(k.startswith("net.") for k in ck["state_dict"])
    assert not [p for p in out.rglob("*.tmp")]
    # the exported model equals the final weights
    assert s["model_file"] == str(out / "model.json")
    model = metamorph.load(s["model_file"])
    assert (out / "model.safetensors").is_file()
    state = torch.load(last, weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["net." + k]), k
    assert model.meta["test_acc"] == pytest.approx(s["test/acc"])
    assert (out / "csv" / "version_0" / "metrics.csv").is_file()


def test_resume_continues(short_run, compose_cfg, tmp_path):
    first_out, _ = short_run
    ckpt = first_out / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(
        "train", tmp_path, [*SHORT, "trainer.max_epochs=2", f"ckpt_path={ckpt}", "test=false"]
    )
    s = train.run(cfg)
    assert s["global_step"] == 6  # 3 restored + 3 new, not 3 from scratch
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 6 and ck["epoch"] >= 1


def test_eval_of_lightning_checkpoint_matches_model_file(short_run, compose_cfg, tmp_path):
    out, _ = short_run
    common = [*TINY_DATA, "latency=false", "device=cpu"]
    a = evaluate.run(
        compose_cfg("eval", tmp_path, [*common, f"src={out / 'checkpoints' / 'last.ckpt'}"])
    )
    b = evaluate.run(compose_cfg("eval", tmp_path, [*common, f"src={out / 'model.json'}"]))
    assert a["images"] == b["images"] == 20
    assert a["acc"] == b["acc"] and a["params"] == b["params"] and a["flops"] == b["flops"]


def test_logger_none(compose_cfg, tmp_path):
    """No logger: the default callbacks (incl. the LR monitor) must still run."""
    cfg = compose_cfg(
        "train", tmp_path, [*SHORT, "logger=none", "test=false", "trainer.limit_train_batches=1"]
    )
    s = train.run(cfg)
    assert s["global_step"] == 1
    assert not (tmp_path / "csv").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "override, where, key",
    [
        ("+data.bath_size=3", "data", "bath_size"),
        ("+task.optim.lrr=0.1", "task.optim", "lrr"),
        ("+task.scheduler.nmae=cosine", "task.scheduler", "nmae"),
        ("+model.with=3", "model", "with"),
    ],
)
def test_config_typo_names_the_key(compose_cfg, tmp_path, override, where, key):
    cfg = compose_cfg("train", tmp_path, [*SHORT, override])
    with pytest.raises(
        ValueError, match=rf"(?s)invalid config `{where}`: Key '{key}' not in .*Valid keys: "
    ):
        train.run(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_config_wrong_type_and_unknown_override(compose_cfg, tmp_path):
    cfg = compose_cfg("train", tmp_path, [*SHORT, "data.batch_size=abc"])
    with pytest.raises(ValueError, match=r"(?s)invalid config `data`.*'abc'.*batch_size"):
        train.run(cfg)
    with pytest.raises(ConfigCompositionException, match=r"data\.bath_size"):
        compose_cfg("train", tmp_path, ["data.bath_size=3"])


def test_unknown_task(compose_cfg, tmp_path):
    cfg = compose_cfg("train", tmp_path, [*SHORT, "task.name=distill"])
    with pytest.raises(ValueError, match="unknown task 'distill'"):
        train.run(cfg)


# ----------------------------------------------------------------------------------------------
# metamorph-convert + metamorph-eval, in process
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def converted(akamaster_ckpt, compose_cfg, tmp_path):
    cfg = compose_cfg(
        "convert", tmp_path, [f"src={akamaster_ckpt.path}", f"out={tmp_path / 'models' / 'r20'}"]
    )
    return convert.run(cfg)


def test_convert_then_eval(converted, akamaster_ckpt, compose_cfg, tmp_path):
    s = converted
    assert s["out"] == str(tmp_path / "models" / "r20.json")
    assert s["weights"] == str(tmp_path / "models" / "r20.safetensors")
    assert Path(s["out"]).is_file() and Path(s["weights"]).is_file()
    assert s["depth"] == 20 and s["params"] == count_params(akamaster_ckpt.source) == 269_722
    assert s["normalization"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    model = metamorph.load(s["out"])
    assert model.meta == {"source": akamaster_ckpt.path.name, "folded": False}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), akamaster_ckpt.source(x))

    common = [*TINY_DATA, "split=test", "device=cpu"]
    e = evaluate.run(compose_cfg("eval", tmp_path, [*common, f"src={s['out']}", "latency=false"]))
    assert e["src"] == s["out"] and e["split"] == "test" and e["images"] == 20
    assert 0.0 <= e["acc"] <= 100.0
    assert e["params"] == 269_722
    assert e["flops"] == _analytic_flops(model)
    assert 80e6 < e["flops"] < 83e6  # ResNet-20: ~40.6 M multiply-adds
    assert not any(k.startswith("latency") for k in e)
    # evaluating the foreign checkpoint directly gives the same numbers
    e2 = evaluate.run(
        compose_cfg("eval", tmp_path, [*common, f"src={akamaster_ckpt.path}", "latency=false"])
    )
    assert (e2["acc"], e2["params"], e2["flops"]) == (e["acc"], e["params"], e["flops"])


def test_eval_with_latency(converted, compose_cfg, tmp_path):
    cfg = compose_cfg(
        "eval",
        tmp_path,
        [
            *TINY_DATA,
            "data.test_subset=10",
            f"src={converted['out']}",
            "latency=true",
            "latency_batch_sizes=[1]",
            "latency_threads=1",
        ],
    )
    e = evaluate.run(cfg)
    assert e["images"] == 10
    assert e["latency_ms_bs1"] > 0
    assert not any(k.startswith("latency") and k != "latency_ms_bs1" for k in e)


def test_convert_fold_bn(akamaster_ckpt, compose_cfg, tmp_path):
    out = tmp_path / "folded"
    s = convert.run(
        compose_cfg(
            "convert", tmp_path, [f"src={akamaster_ckpt.path}", f"out={out}", "fold_bn=true"]
        )
    )
    doc = json.loads(Path(s["out"]).read_text())
    assert doc["arch"]["bn"] is False and doc["meta"]["folded"] is True
    model = metamorph.load(s["out"])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, out_ = akamaster_ckpt.source(x), model(x)
    assert ((out_ - ref).norm() / ref.norm()).item() < 1e-5
    assert s["params"] < count_params(akamaster_ckpt.source)  # BN affine params folded away


def test_eval_rejects_class_mismatch(compose_cfg, tmp_path):
    m = metamorph.create_model("resnet20", num_classes=7, blocks_per_stage=1)
    metamorph.io.save_model(m, tmp_path / "c7")
    cfg = compose_cfg(
        "eval", tmp_path, [*TINY_DATA, f"src={tmp_path / 'c7.json'}", "latency=false"]
    )
    with pytest.raises(ValueError, match="model has 7 classes but cifar10 has 10"):
        evaluate.run(cfg)


# ----------------------------------------------------------------------------------------------
# Console scripts (one subprocess each)
# ----------------------------------------------------------------------------------------------


def test_console_convert_and_eval(akamaster_ckpt, tmp_path):
    out = tmp_path / "m" / "r20"
    p = run_script("metamorph-convert", [f"src={akamaster_ckpt.path}", f"out={out}"], cwd=tmp_path)
    s = last_json_line(p.stdout)
    assert set(s) == {"src", "out", "weights", "depth", "params", "normalization"}
    assert s["out"] == str(out) + ".json" and s["depth"] == 20 and s["params"] == 269_722
    assert s["normalization"]["mean"] == list(IMAGENET_MEAN)
    assert Path(s["weights"]).is_file()
    assert (tmp_path / "outputs" / "runs" / "convert").is_dir()  # Hydra's run dir under the cwd

    p = run_script(
        "metamorph-eval",
        [f"src={s['out']}", *TINY_DATA, "latency=false", "device=cpu"],
        cwd=tmp_path,
    )
    e = last_json_line(p.stdout)
    assert {"src", "split", "images", "acc", "params", "flops", "time_s"} <= set(e)
    assert e["images"] == 20 and e["params"] == 269_722 and e["flops"] > 8e7
    assert "accuracy" in p.stdout


def test_console_train_fdr(tmp_path):
    run_dir = tmp_path / "run"
    p = run_script(
        "metamorph-train", ["debug=fdr", *TINY_DATA, f"hydra.run.dir={run_dir}"], cwd=tmp_path
    )
    s = last_json_line(p.stdout)
    assert {"task", "model", "output_dir", "global_step", "val/acc", "test/acc", "time_s"} <= set(s)
    assert s["global_step"] == 1 and s["output_dir"] == str(run_dir)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (run_dir / "model.json").exists()


# ----------------------------------------------------------------------------------------------
# Slow: fault tolerance, interrupted checkpoint writes, DDP, multirun
# ----------------------------------------------------------------------------------------------

# 20 steps per epoch (1280 images / 64), 30 steps in all: a kill can land mid-epoch. The
# unmonitored ``last_checkpoint`` callback writes last.ckpt after every step.
FT_ARGS = [
    "data.root=embedded:cifar10-mini",
    "data.train_subset=1280",
    "data.val_size=20",
    "data.test_subset=20",
    "data.batch_size=64",
    "data.eval_batch_size=20",
    "trainer.max_steps=30",
    "trainer.max_epochs=100",
    "trainer.log_every_n_steps=1",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "test=false",
    *QUIET,
]
FT_STEPS_PER_EPOCH = 20


def _global_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return None


def _csv_steps(run_dir: Path, version: int) -> list[int]:
    lines = (run_dir / "csv" / f"version_{version}" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("step")
    return [int(row.split(",")[col]) for row in lines[1:] if row.split(",")[col]]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [*script_cmd("metamorph-train"), *FT_ARGS, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    killed_at = None
    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            step = _global_step(last) if last.exists() else None
            if step is not None and step >= 3 and step % FT_STEPS_PER_EPOCH:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait()
        log.close()
    output = (tmp_path / "killed.log").read_text()[-3000:]
    assert killed_at is not None, f"run ended before it could be killed:\n{output}"
    assert proc.returncode == -signal.SIGKILL
    at_kill = _global_step(last)  # may be a step or two past what we saw
    assert at_kill is not None, "last.ckpt unreadable after SIGKILL"
    assert 3 <= at_kill < 30 and at_kill % FT_STEPS_PER_EPOCH, at_kill

    p = run_script(
        "metamorph-train", [*FT_ARGS, f"hydra.run.dir={run_dir}", f"ckpt_path={last}"], cwd=tmp_path
    )
    resumed = last_json_line(p.stdout)
    full_dir = tmp_path / "full"
    p = run_script("metamorph-train", [*FT_ARGS, f"hydra.run.dir={full_dir}"], cwd=tmp_path)
    full = last_json_line(p.stdout)

    assert resumed["global_step"] == full["global_step"] == 30
    assert _global_step(last) == _global_step(full_dir / "checkpoints" / "last.ckpt") == 30
    # the resumed process trained from the checkpoint on, it did not start over
    steps = _csv_steps(run_dir, 1)
    assert steps and min(steps) >= at_kill - 1, (at_kill, steps[:5])
    assert metamorph.load(run_dir / "model.json").arch.depth == 20


@pytest.mark.slow
def test_checkpoint_write_failure_during_training_keeps_last_ckpt(
    compose_cfg, tmp_path, monkeypatch
):
    """torch.save dies half-way through a checkpoint write of a real run.

    ``last_checkpoint`` (no monitor) writes last.ckpt after every step: steps 1 and 2 complete,
    the write at step 3 dies half-way.
    """
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            real_save(obj, f, *args, **kwargs)
            data = Path(f).read_bytes()
            Path(f).write_bytes(data[: len(data) // 2])
            raise OSError("interrupted checkpoint write")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    cfg = compose_cfg(
        "train",
        tmp_path,
        [
            *SHORT,
            "trainer.max_epochs=3",
            "callbacks.last_checkpoint.every_n_train_steps=1",
            "test=false",
        ],
    )
    with pytest.raises(OSError, match="interrupted checkpoint write"):
        train.run(cfg)
    assert calls["n"] == 3
    last = tmp_path / "checkpoints" / "last.ckpt"
    ck = AtomicCheckpointIO().load_checkpoint(last)  # complete and loadable: the step-4 one
    assert ck["global_step"] == 2
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_last_ckpt(tmp_path):
    """A process killed while writing a checkpoint leaves the previous one intact."""
    script = textwrap.dedent(
        f"""
        import io, sys, time, torch
        from pathlib import Path
        from metamorph.runtime.checkpoint_io import AtomicCheckpointIO
        ckio = AtomicCheckpointIO()
        path = Path({str(tmp_path / "last.ckpt")!r})
        ckio.save_checkpoint({{"global_step": 1, "w": torch.ones(1000)}}, path)
        real_save = torch.save
        def half_then_hang(obj, f, *a, **k):
            buf = io.BytesIO(); real_save(obj, buf)
            with open(f, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2]); fh.flush()
            print("WRITING", flush=True)
            time.sleep(600)
        torch.save = half_then_hang
        ckio.save_checkpoint({{"global_step": 2, "w": torch.zeros(1000)}}, path)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(tmp_path),
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        temps = list(tmp_path.glob(".last.ckpt.*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # the half-written new checkpoint
    finally:
        proc.kill()
        proc.wait()
    ck = AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    assert ck["global_step"] == 1 and torch.equal(ck["w"], torch.ones(1000))


@pytest.mark.slow
def test_ddp_sim_two_processes(tmp_path):
    run_dir = tmp_path / "ddp"
    args = [
        "trainer=ddp_sim",
        *TINY_DATA,
        "data.train_subset=32",
        "data.batch_size=8",
        "trainer.max_epochs=1",
        *QUIET,
        f"hydra.run.dir={run_dir}",
    ]
    p = run_script("metamorph-train", args, cwd=tmp_path, timeout=400)
    summaries = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(summaries) == 2  # one per rank
    assert all(s["global_step"] == 2 for s in summaries)  # 32 images / 2 ranks / batch 8
    assert sum("model_file" in s for s in summaries) == 1  # rank 0 only
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert metamorph.load(run_dir / "model.json").arch.depth == 20


@pytest.mark.slow
def test_multirun_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", *SHORT, "test=false", f"hydra.sweep.dir={sweep}"]
    p = run_script("metamorph-train", args, cwd=tmp_path)
    summaries = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert [s["output_dir"] for s in summaries] == [str(sweep / "0"), str(sweep / "1")]
    for job, seed in (("0", 0), ("1", 1)):
        d = sweep / job
        assert f"seed={seed}" in (d / ".hydra" / "overrides.yaml").read_text()
        assert (d / "checkpoints" / "last.ckpt").is_file()
        assert metamorph.load(d / "model.json").arch.depth == 20
    w0 = metamorph.load(sweep / "0" / "model.json").fc.weight
    w1 = metamorph.load(sweep / "1" / "model.json").fc.weight
    assert not torch.equal(w0, w1)  # different seeds, different runs


def test_help_into_a_closed_pipe_ends_quietly():
    """``metamorph-train --help | head -1``: the reader is gone before the help is written; the
    tool exits 0 without a BrokenPipeError traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader closed before anything was written
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "metamorph.cli.train", "--help"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
