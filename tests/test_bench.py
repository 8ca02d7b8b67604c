"""``metamorph-bench`` with tiny settings: emission, K-sample averaging, training steps, memory."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import compose_config, script_cmd, subprocess_env

from metamorph.cli import bench
from metamorph.hypernet.inr import INRConfig

torch.set_num_threads(1)

TINY = [
    "hypernet.hidden=16",
    "hypernet.layers=2",
    "hypernet.freqs=4",
    "threads=1",
    "batch_size=4",
    "repeats=1",
    "warmup=0",
    "train_repeats=1",
    "k_values=[1,3]",
    "matmul_size=64",
    "matmul_rows=256",
]


def test_bench_random_weights(tmp_path, capsys):
    cfg = compose_config("bench", tmp_path, [*TINY, "models=[resnet20]", "memory=false"])
    s = bench.run(cfg)
    assert {"device", "threads", "batch_size", "hypernet", "matmul", "emission", "training"} <= set(
        s
    )
    assert s["threads"] == 1 and s["device"] == "cpu" and s["hypernet"]["hidden"] == 16
    assert s["matmul"]["square_gflops"] > 0 and s["matmul"]["inr_shaped_gflops"] > 0
    e = s["emission"]["resnet20"]
    assert e["tensors"] == 4 * 9  # every block metamorphic: 2 convs + 2 biases each
    assert e["weights"] == 267_936  # conv1/conv2 weights and biases of the 9 blocks
    assert e["emit_ms"] > 0 and e["inr_gflop"] > 0 and e["inr_gflops"] > 0
    assert e["efficiency"] == pytest.approx(e["inr_gflops"] / e["matmul_square_gflops"])
    assert s["matmul"]["square_gflops"] >= e["matmul_square_gflops"]
    assert set(e["k_ms"]) == {"1", "3"} and e["k_ratio"]["1"] == pytest.approx(1.0)
    assert e["k_ratio"]["3"] == pytest.approx(e["k_ms"]["3"] / (3 * e["k_ms"]["1"]))
    t = s["training"]["resnet20"]
    assert t["metamorph_step_ms"] > 0 and t["plain_step_ms"] > 0
    assert t["ratio"] == pytest.approx(t["metamorph_step_ms"] / t["plain_step_ms"])
    assert t["ratio_vs_folded"] == pytest.approx(t["metamorph_step_ms"] / t["plain_folded_step_ms"])
    assert "memory_method" not in s
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "K=3" in out and "training step" in out


def test_emission_flops_match_the_inr_layers():
    """The counted INR FLOPs are 2 x multiply-adds of every head's linear layers; the
    noise-free emission's input layer runs once per grid row, column and constant query
    (outer sum), the rest of each head once per query."""
    inr = INRConfig(hidden=16, layers=2, freqs=4)
    net = bench.build_metanet("resnet20", inr)
    e = bench.bench_emission(net, torch.device("cpu"), 1, 0, [1], noise=1.0)
    feat = 1 + 2 * inr.freqs  # Fourier features of one coordinate
    expected = 0
    for t in net.emit(net.full_shape).values():
        r, c = t.shape[0], (t.shape[1] if t.dim() == 4 else 1)
        out_dim = inr.kernel_out if t.dim() == 4 else 1
        first = 6 * feat * inr.hidden + (r + c) * feat * inr.hidden  # x0, then rows and columns
        per = (inr.layers - 1) * inr.hidden**2 + inr.hidden * out_dim
        expected += 2 * (first + r * c * per)
    assert e["inr_gflop"] * 1e9 == pytest.approx(expected)


def test_memory_worker_in_process():
    """The worker's measurement itself (normally run in a fresh subprocess per mode)."""
    args = {
        "mode": "metamorph",
        "model": "resnet20",
        "ckpt": None,
        "inr": {"hidden": 16, "layers": 2, "freqs": 4},
        "batch_size": 8,
        "steps": 1,
        "threads": 1,
        "device": "cpu",
        "noise": 1.0,
    }
    r = bench.memory_worker(args)
    assert r["peak_mb"] >= r["before_mb"] > 50 and r["delta_mb"] >= 0
    assert r["trainable_params"] > 0
    r = bench.memory_worker({**args, "mode": "plain"})
    assert r["trainable_params"] == 269_722


@pytest.mark.slow
def test_memory_is_measured_in_subprocesses():
    m = bench.bench_memory(
        "resnet20",
        None,
        INRConfig(hidden=16, layers=2, freqs=4),
        batch_size=16,
        steps=1,
        threads=1,
        device=torch.device("cpu"),
        noise=1.0,
        timeout=300,
    )
    for mode in bench.MODES:
        assert m[f"{mode}_peak_mb"] >= m[f"{mode}_before_mb"] > 50  # a whole torch process
        assert m[f"{mode}_delta_mb"] > 0  # activations, gradients, optimizer state
        assert m[f"{mode}_adamw_state_mb"] == pytest.approx(
            8 * m[f"{mode}_trainable_params"] / 2**20
        )
    # the peaks are this process's own, not the parent's RSS inherited at exec
    assert len({round(m[f"{mode}_peak_mb"], 3) for mode in bench.MODES}) == 3
    assert m["plain_trainable_params"] == 269_722  # resnet20 with BN
    assert 0 < m["metamorph_trainable_params"] < m["plain_trainable_params"]


def test_bench_console_script_on_checkpoint(tmp_path):
    from test_sample import make_metamorph_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAMORPH_CACHE", str(tmp_path / "cache"))
        ckpt = make_metamorph_checkpoint(tmp_path / "mm", steps=1)
    proc = subprocess.run(
        [*script_cmd_bench(), f"ckpt={ckpt}", *TINY, "memory=false"],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads([ln for ln in proc.stdout.splitlines() if ln.strip()][-1])
    assert s["ckpt"] == str(ckpt)
    assert list(s["emission"]) == ["resnet14 (ckpt)"] and list(s["training"]) == ["resnet14 (ckpt)"]
    assert s["emission"]["resnet14 (ckpt)"]["tensors"] == 4 * 6
    assert s["hypernet"]["hidden"] == 16  # the checkpoint's INR, not the hypernet group's
    assert "[metamorph-bench]" in proc.stdout


def test_bench_bad_input(tmp_path):
    with pytest.raises(ValueError, match="k_values"):
        bench.run(compose_config("bench", tmp_path, [*TINY, "k_values=[0]"]))
    with pytest.raises(ValueError, match="unknown model"):
        bench.run(compose_config("bench", tmp_path, [*TINY, "models=[resnet7]", "memory=false"]))


def script_cmd_bench() -> list[str]:
    try:
        return script_cmd("metamorph-bench")
    except KeyError:
        import sys

        return [sys.executable, "-m", "metamorph.cli.bench"]
