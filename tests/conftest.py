"""Shared fixtures: single-threaded torch, Hydra composition into tmp dirs, tiny data overrides,
a synthetic akamaster-style checkpoint, and helpers for running the console scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

# Tiny convs on a busy 2-core box: intra-op threads only add overhead (up to 300x slowdowns).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "metamorph" / "conf"

# The embedded mini CIFAR-10 cut to a handful of images: 48 train (3 batches of 16), 20 val, 20 test.
TINY_DATA = [
    "data.root=embedded:cifar10-mini",
    "data.train_subset=48",
    "data.val_size=20",
    "data.test_subset=20",
    "data.batch_size=16",
    "data.eval_batch_size=20",
]
# No progress bars (they only add output and time); CPU only.
QUIET = [
    "callbacks.progress_bar=null",
    "+trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm running statistics and affine parameters (so folding is tested)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            m.num_batches_tracked.fill_(123)
    return model


@pytest.fixture(name="randomize_bn")
def _randomize_bn_fixture():
    return randomize_bn


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """Keep the code under test away from /work/shared and the user's cache."""
    monkeypatch.setenv("METAMORPH_SHARED", str(tmp_path / "no-shared"))
    monkeypatch.setenv("METAMORPH_CACHE", str(tmp_path / "cache"))
    return tmp_path


def compose_config(config_name: str, out_dir: Path, overrides: list[str]):
    """Compose ``conf/<config_name>.yaml`` with ``paths`` pointing into ``out_dir`` (resolvable
    without a running Hydra app)."""
    from hydra import compose, initialize_config_dir

    out_dir = Path(out_dir)
    base = [f"paths.root_dir={out_dir}", f"paths.output_dir={out_dir}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=base + list(overrides))


@pytest.fixture
def compose_cfg(isolated_env):
    return compose_config


@dataclass
class AkamasterCheckpoint:
    path: Path
    source: nn.Module  # the model whose weights the checkpoint holds (eval mode; don't modify)
    best_prec1: float


def write_akamaster_checkpoint(path: Path, depth: int = 20, seed: int = 0) -> AkamasterCheckpoint:
    """A checkpoint laid out like akamaster's ``resnetXX-*.th``: ``module.`` prefix, ``linear``
    instead of ``fc``, no ``num_batches_tracked`` buffers, plus ``best_prec1``."""
    from metamorph import create_model

    torch.manual_seed(seed)
    model = randomize_bn(create_model(f"resnet{depth}"), seed=seed).eval()
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.startswith("fc."):
            k = "linear." + k[len("fc.") :]
        state["module." + k] = v.clone()
    torch.save({"state_dict": state, "best_prec1": 91.0}, path)
    return AkamasterCheckpoint(Path(path), model, 91.0)


@pytest.fixture(scope="session")
def akamaster_ckpt(tmp_path_factory) -> AkamasterCheckpoint:
    d = tmp_path_factory.mktemp("akamaster")
    return write_akamaster_checkpoint(d / "resnet20-synthetic.th")


def script_cmd(name: str) -> list[str]:
    """The console script ``name`` (``metamorph-train`` ...) as an argv prefix."""
    exe = shutil.which(name)
    if exe is not None:
        return [exe]
    module = {
        "metamorph-train": "train",
        "metamorph-eval": "evaluate",
        "metamorph-convert": "convert",
    }
    return [sys.executable, "-m", f"metamorph.cli.{module[name]}"]


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        METAMORPH_SHARED=str(tmp_path / "no-shared"),
        METAMORPH_CACHE=str(tmp_path / "cache"),
        HYDRA_FULL_ERROR="1",
    )
    return env


def run_script(
    name: str, args: list[str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run a console script to completion; fail with its output if it exits non-zero."""
    proc = subprocess.run(
        script_cmd(name) + list(args),
        cwd=cwd,
        env=subprocess_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def last_json_line(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert lines, "no output on stdout"
    return json.loads(lines[-1])
