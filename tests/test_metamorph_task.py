"""``task=metamorph`` end to end through Hydra: pretrain a tiny base, train its metamorphic INR,
sweep the compression ratios, checkpoint, reload and resume (CPU, a few steps each)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from metamorph import create_model
from metamorph.cli.train import run
from metamorph.hypernet.permute import (
    apply_permutations,
    channel_groups,
    random_orders,
    total_variation,
)
from metamorph.tasks import metamorph_train
from metamorph.tasks.metamorph import MetamorphModule
from metamorph.tasks.metamorph_train import load_metamorph_checkpoint, prepare_base

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "metamorph" / "conf"
GAMMA_LABELS = ["g0", "g0.125", "g0.25", "g0.375", "g0.5", "g0.625", "g0.75"]

DATA = [
    "trainer=cpu",
    "data=cifar10_mini",
    "data.train_subset=256",
    "data.val_size=64",
    "data.test_subset=64",
    "data.batch_size=64",
    "data.eval_batch_size=64",
    "~callbacks.progress_bar",
    "~callbacks.lr_monitor",
    "+trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]
INR = ["hypernet=small", "hypernet.hidden=16", "hypernet.layers=2", "hypernet.freqs=4"]


def compose_cfg(root: Path, out: Path, overrides: list[str]):
    """The ``train`` config, with the run folder set directly (no Hydra run needed)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.root_dir={root}", f"paths.output_dir={out}", *overrides]
        )


def metamorph_overrides(base: Path, *extra: str) -> list[str]:
    return [
        "task=metamorph",
        f"task.base={base}",
        "task.prepare.tsp_time_limit=0.01",
        *DATA,
        *INR,
        *extra,
    ]


class Recording(MetamorphModule):
    """Remembers every instance and, at the start of training (after any checkpoint restore),
    the state the training resumes from."""

    instances: list[Recording] = []

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        Recording.instances.append(self)
        self.at_start: dict | None = None

    def on_train_start(self) -> None:
        full = self.net.full_shape
        opt = self.trainer.optimizers[0].state_dict()
        self.at_start = {
            "global_step": self.trainer.global_step,
            "inr": {k: v.detach().clone() for k, v in self.net.emit(full).items()},
            "ema": self.emit_eval(full),
            "optimizer": {
                i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                for i, s in opt["state"].items()
            },
        }


def run_recorded(cfg) -> tuple[dict, Recording]:
    Recording.instances.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metamorph_train, "MetamorphModule", Recording)
        summary = run(cfg)
    assert len(Recording.instances) == 1
    return summary, Recording.instances[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("metamorph_task")


@pytest.fixture(scope="module")
def base_run(workdir) -> dict:
    """A tiny pretrained resnet20 exported to ``<workdir>/base`` (+ its pretrain checkpoints)."""
    out = workdir / "pretrain"
    cfg = compose_cfg(
        workdir,
        out,
        [
            "task=pretrain",
            *DATA,
            "+trainer.limit_train_batches=2",
            "trainer.max_epochs=1",
            f"export_to={workdir / 'base'}",
            "logger=none",
        ],
    )
    summary = run(cfg)
    assert summary["exported"] == str(workdir / "base.json")
    return {"summary": summary, "out": out, "base": workdir / "base.json"}


@pytest.fixture(scope="module")
def mm_run(workdir, base_run) -> dict:
    """6 INR steps (4 per epoch: a full epoch, then stop mid-epoch), checkpoint every 2 steps."""
    out = workdir / "mm"
    cfg = compose_cfg(
        workdir,
        out,
        metamorph_overrides(
            base_run["base"],
            "trainer.max_steps=6",
            "trainer.max_epochs=5",
            "callbacks.last_checkpoint.every_n_train_steps=2",
        ),
    )
    summary, module = run_recorded(cfg)
    return {"summary": summary, "out": out, "module": module, "cfg": cfg}


@pytest.fixture(scope="module")
def resumed_run(workdir, base_run, mm_run) -> dict:
    out = workdir / "mm_resumed"
    ckpt = workdir / "resume_from.ckpt"
    shutil.copy(mm_run["out"] / "checkpoints" / "last.ckpt", ckpt)
    cfg = compose_cfg(
        workdir,
        out,
        metamorph_overrides(
            base_run["base"],
            "trainer.max_steps=10",
            "trainer.max_epochs=5",
            "callbacks.last_checkpoint.every_n_train_steps=2",
            f"ckpt_path={ckpt}",
            "test=false",
        ),
    )
    summary, module = run_recorded(cfg)
    return {"summary": summary, "out": out, "module": module, "ckpt": ckpt}


# ----------------------------------------------------------------------------------------------
# The run, its sweep, metrics and files
# ----------------------------------------------------------------------------------------------


def test_summary(mm_run):
    s = mm_run["summary"]
    assert s["task"] == "metamorph"
    assert s["global_step"] == 6
    assert s["inr_params"] == sum(p.numel() for p in mm_run["module"].net.inr.parameters())
    assert list(s["test_sweep"]) == GAMMA_LABELS
    assert all(0.0 <= v <= 100.0 for v in s["test_sweep"].values())
    assert 0.0 <= s["test/acc"] <= 1.0
    assert s["tv_before"] >= s["tv_after"] > 0
    assert s["checkpoint"] == str(mm_run["out"] / "metamorph.ckpt")
    json.dumps(s)  # plain data
    module = mm_run["module"]
    assert module.net.meta_blocks == ["layer3.2"]
    assert module.net.inr.cfg.hidden == 16 and module.net.inr.cfg.freqs == 4


def test_sweep_csv_marks_seen_and_unseen(mm_run):
    sweep = mm_run["out"] / "sweep"
    assert (sweep / "test.png").stat().st_size > 1000
    assert (sweep / "val_epoch000.png").exists()
    with open(sweep / "test.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == GAMMA_LABELS
    seen = {r["label"]: r["seen"] for r in rows}
    # Trained range [0.5, 1.0] x 64: gamma <= 0.5 is seen, 0.625 and 0.75 are not.
    assert seen == {lab: str(lab not in ("g0.625", "g0.75")) for lab in GAMMA_LABELS}
    hidden = {r["label"]: json.loads(r["hidden"]) for r in rows}
    assert hidden["g0"][2] == [64, 64, 64] and hidden["g0.75"][2] == [64, 64, 16]
    params = [int(r["params"]) for r in rows]
    assert params == sorted(params, reverse=True) and params[0] > params[-1]
    accs = {r["label"]: float(r["acc"]) for r in rows}
    assert accs == pytest.approx(mm_run["summary"]["test_sweep"], abs=0.01)


def test_sweep_metrics_logged(mm_run):
    path = mm_run["out"] / "csv" / "version_0" / "metrics.csv"
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for key in ("val/acc@g0.25", "val/acc@g0.75", "test/acc@g0.25", "val/acc", "train/loss"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values, key
        assert all(0.0 <= v <= 100.0 for v in values)


def test_checkpoints_load_weights_only(mm_run):
    for path in (mm_run["out"] / "metamorph.ckpt", mm_run["out"] / "checkpoints" / "last.ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        sd = ckpt["state_dict"]
        assert any(k.startswith("ema.shadow.heads.") for k in sd)
        assert any(k.startswith("net.inr.heads.") for k in sd)
        assert ckpt["optimizer_states"] and ckpt["hyper_parameters"]["metamorph"]
    assert (
        torch.load(mm_run["out"] / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        == 6
    )


def test_load_metamorph_checkpoint_reproduces_the_ema_emission(mm_run):
    trained = mm_run["module"]
    loaded = load_metamorph_checkpoint(mm_run["out"] / "metamorph.ckpt")
    assert type(loaded) is MetamorphModule and not loaded.training
    assert loaded.net.meta_blocks == trained.net.meta_blocks
    assert loaded.cfg == trained.cfg
    net = trained.net
    for hidden, k in [
        (net.full_shape, 1),
        (net.shape_for_gamma(0.5), 1),
        (net.shape_for_gamma(0.25), 3),
    ]:
        a, b = trained.emit_eval(hidden, k=k, seed=2), loaded.emit_eval(hidden, k=k, seed=2)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n], b[n]) for n in a)
    # The EMA differs from the live INR, and both were restored.
    live_a, live_b = net.emit(net.full_shape), loaded.net.emit(net.full_shape)
    assert all(torch.equal(live_a[n], live_b[n]) for n in live_a)
    ema = trained.emit_eval(net.full_shape)
    assert any(not torch.equal(ema[n], live_a[n]) for n in ema)
    # The frozen prepared base matches the exported "prepared" model file too.
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x, net.full_shape), trained.net(x, net.full_shape))
    from metamorph.io.model_file import load_model

    prepared = load_model(mm_run["out"] / "prepared.json")
    for name, t in prepared.state_dict().items():
        assert torch.equal(loaded.net.base_tensor(name), t), name


def test_strip_checkpoint_keeps_the_ema_emission(mm_run, tmp_path):
    """scripts/strip_checkpoint.py: smaller file, no optimizer state, same EMA emission."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "strip_checkpoint", Path(__file__).resolve().parents[1] / "scripts" / "strip_checkpoint.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src, dst = mm_run["out"] / "metamorph.ckpt", tmp_path / "infer.ckpt"
    report = mod.strip(src, dst)
    assert report["ema_applied"] and dst.stat().st_size < src.stat().st_size
    ckpt = torch.load(dst, weights_only=True)
    assert "optimizer_states" not in ckpt
    assert not any(k.startswith("ema.") for k in ckpt["state_dict"])
    full, slim = load_metamorph_checkpoint(src), load_metamorph_checkpoint(dst)
    assert slim.ema is None and full.ema is not None
    net = full.net
    for hidden in (net.full_shape, net.shape_for_gamma(0.5)):
        a, b = full.emit_eval(hidden, k=3, seed=1), slim.emit_eval(hidden, k=3, seed=1)
        assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="not a metamorphic checkpoint"):
        mod.strip(mm_run["out"] / "prepared.safetensors", tmp_path / "x.ckpt")


def test_load_metamorph_checkpoint_errors(mm_run, base_run, tmp_path):
    with pytest.raises(ValueError, match="not a metamorphic checkpoint"):
        load_metamorph_checkpoint(base_run["out"] / "checkpoints" / "last.ckpt")
    data = (mm_run["out"] / "metamorph.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_metamorph_checkpoint(tmp_path / "cut.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(ValueError):
        load_metamorph_checkpoint(tmp_path / "text.ckpt")
    with pytest.raises(FileNotFoundError):
        load_metamorph_checkpoint(tmp_path / "missing.ckpt")


def test_config_errors(workdir, base_run):
    cfg = compose_cfg(workdir, workdir / "bad", metamorph_overrides(workdir / "nope.json"))
    with pytest.raises(FileNotFoundError, match="task.base"):
        run(cfg)
    cfg = compose_cfg(
        workdir, workdir / "bad", metamorph_overrides(base_run["base"], "+task.bogus=1")
    )
    with pytest.raises(ValueError, match="bogus"):
        run(cfg)
    cfg = compose_cfg(
        workdir, workdir / "bad", metamorph_overrides(base_run["base"], "+hypernet.width=3")
    )
    with pytest.raises(ValueError, match="hypernet"):
        run(cfg)


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------


def test_resume_restores_inr_ema_and_optimizer(resumed_run):
    assert resumed_run["summary"]["global_step"] == 10
    ckpt = torch.load(resumed_run["ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert any(k.startswith("ema.shadow.") for k in ckpt["state_dict"])
    start = resumed_run["module"].at_start
    assert start["global_step"] == 6
    # The first emission of the resumed run is the checkpointed one (live INR and EMA).
    saved = load_metamorph_checkpoint(resumed_run["ckpt"])
    full = saved.net.full_shape
    inr, ema = saved.net.emit(full), saved.emit_eval(full)
    assert all(torch.equal(start["inr"][k], inr[k]) for k in inr)
    assert all(torch.equal(start["ema"][k], ema[k]) for k in ema)
    assert any(not torch.equal(inr[k], ema[k]) for k in inr)
    # The optimizer state (AdamW moments and step counts) was restored.
    saved_state = ckpt["optimizer_states"][0]["state"]
    assert start["optimizer"].keys() == saved_state.keys() and saved_state
    for i, s in saved_state.items():
        for key, v in s.items():
            assert torch.equal(torch.as_tensor(start["optimizer"][i][key]), torch.as_tensor(v))
    assert float(saved_state[0]["step"]) == 6
    # Training went on from there, and its own checkpoint has step 10.
    last = torch.load(resumed_run["out"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10
    assert float(last["optimizer_states"][0]["state"][0]["step"]) == 10
    assert not all(
        torch.equal(last["state_dict"][k], v)
        for k, v in ckpt["state_dict"].items()
        if k.startswith("ema.shadow.")
    )


# ----------------------------------------------------------------------------------------------
# Preparing the base network
# ----------------------------------------------------------------------------------------------


def smooth_then_shuffled(seed: int = 0) -> nn.Module:
    """A resnet20 whose weights vary smoothly over channels, then randomly permuted."""
    torch.manual_seed(seed)
    model = create_model("resnet20")
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                o = mod.weight.shape[0]
                ro = torch.linspace(0, 3, o).reshape(o, 1, 1, 1)
                proto = torch.randn_like(mod.weight[:1]) * (2.0 / mod.weight[0].numel()) ** 0.5
                mod.weight.copy_(
                    proto * (1 + 0.5 * torch.sin(ro))
                    + 0.05 * proto.std() * torch.randn_like(mod.weight)
                )
            elif isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.8, 1.2)
                mod.weight.normal_(1.0, 0.05)
                mod.bias.normal_(0.0, 0.05)
    groups = channel_groups(model)
    apply_permutations(model, groups, random_orders(groups, torch.Generator().manual_seed(seed)))
    return model.eval()


def test_prepare_base_preserves_function_and_lowers_tv():
    model = smooth_then_shuffled()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    prepared, report = prepare_base(model, fold=True, permute=True, time_limit=0.1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert prepared.arch.bn is False
    with torch.no_grad():
        out = prepared(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-5, float(rel)
    assert report["tv_before"] > report["tv_after"] > 0
    assert report["tv_after"] == pytest.approx(total_variation(prepared))
    assert report["tv_before"] > 1.2 * report["tv_after"]  # much of the shuffle is undone
    # fold only: the function is kept, nothing is permuted.
    model2 = smooth_then_shuffled()
    folded, rep2 = prepare_base(model2, fold=True, permute=False, time_limit=0.1)
    assert rep2 == {}
    with torch.no_grad():
        assert ((folded(x) - ref).norm() / ref.norm()) < 1e-5


# ----------------------------------------------------------------------------------------------
# SIGKILL mid-epoch, then resume (subprocess; slow)
# ----------------------------------------------------------------------------------------------


def _cli() -> list[str]:
    exe = shutil.which("metamorph-train")
    return [exe] if exe else [sys.executable, "-m", "metamorph.cli.train"]


def _cli_args(workdir: Path, run_dir: Path, base: Path, *extra: str) -> list[str]:
    return [
        *_cli(),
        *metamorph_overrides(
            base,
            "data.batch_size=32",  # 8 steps per epoch
            "trainer.max_epochs=2",
            "trainer.max_steps=12",
            "callbacks.last_checkpoint.every_n_train_steps=2",
            "test=false",
            "logger=none",
        ),
        f"hydra.run.dir={run_dir}",
        f"paths.root_dir={workdir}",
        *extra,
    ]


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(workdir, base_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    full = subprocess.run(
        _cli_args(workdir, workdir / "cli_full", base_run["base"]),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    assert full.returncode == 0, full.stderr[-3000:]
    expected = _summary(full.stdout)["global_step"]
    assert expected == 12

    run_dir = workdir / "cli_killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        _cli_args(workdir, run_dir, base_run["base"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    try:
        deadline = time.time() + 300
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert last.exists() and proc.poll() is None, "no last.ckpt before the run ended"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    killed_at = ckpt["global_step"]
    assert 0 < killed_at < expected
    assert killed_at % 8 != 0  # mid-epoch

    resumed = subprocess.run(
        _cli_args(workdir, run_dir, base_run["base"], f"ckpt_path={last}"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _summary(resumed.stdout)["global_step"] == expected
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == expected
    assert load_metamorph_checkpoint(run_dir / "metamorph.ckpt").net.meta_blocks == ["layer3.2"]
