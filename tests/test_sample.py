"""``metamorph-sample`` and the metamorphic ``metamorph-eval`` sweep: sampling by ratio, shape and
budget, ONNX / torch.export outputs, bad input (clear errors, no files left), sweep outputs.

One tiny metamorphic checkpoint (ResNet-14 base, every block metamorphic, depth choices [1, 2],
INR hidden=16 layers=2 freqs=4) is trained for two steps through Lightning and shared by all tests.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_DATA, compose_config, script_cmd, subprocess_env

import metamorph
from metamorph.cli import evaluate, sample
from metamorph.export import (
    Budget,
    candidate_shapes,
    load_metamorphic,
    materialize,
    select_for_budget,
)
from metamorph.export.sample import val_batches
from metamorph.runtime.data import build_datamodule

torch.set_num_threads(1)

CONF_DIR = Path(__file__).resolve().parents[1] / "metamorph" / "conf"
INR = ["hypernet=small", "hypernet.hidden=16", "hypernet.layers=2", "hypernet.freqs=4"]


def _trainer(max_steps: int):
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def make_metamorph_checkpoint(folder: Path, steps: int = 2) -> Path:
    """A real ``task=metamorph`` checkpoint (Lightning ``save_checkpoint``) of a random ResNet-14
    (BN folded), every block metamorphic, depth choices [1, 2]; ``steps`` training steps, so the
    EMA INR differs from the live one."""
    from metamorph import create_model
    from metamorph.hypernet.metanet import MetaResNet
    from metamorph.models import fold_batchnorm
    from metamorph.runtime.summary import plain
    from metamorph.tasks.metamorph import MetamorphModule
    from metamorph.tasks.metamorph_train import metamorph_config

    cfg = compose_config(
        "train",
        folder,
        [
            "task=metamorph",
            *INR,
            *TINY_DATA,
            "task.scope.blocks=[all]",
            "task.scope.depth_choices=[1,2]",
            "task.ema_decay=0.9",
        ],
    )
    mcfg = metamorph_config(cfg)
    torch.manual_seed(0)
    base = create_model("resnet20", blocks_per_stage=2).eval()
    fold_batchnorm(base)
    net = MetaResNet(base, mcfg.spec, mcfg.inr, shared=mcfg.shared)
    module = MetamorphModule(net, mcfg, hparams=plain(cfg))
    dm = build_datamodule(cfg.data, mean=base.arch.mean, std=base.arch.std, seed=0)
    trainer = _trainer(steps)
    trainer.fit(module, datamodule=dm)
    path = folder / "metamorph.ckpt"
    trainer.save_checkpoint(path)
    return path


def make_pretrain_checkpoint(folder: Path) -> Path:
    """A plain ``task=pretrain`` checkpoint (one step of a ResNet-8)."""
    from metamorph.config.schema import OptimConfig, SchedulerConfig, typed
    from metamorph.runtime.networks import build_model
    from metamorph.runtime.summary import plain
    from metamorph.tasks.classifier import ClassifierModule

    cfg = compose_config(
        "train", folder, ["task=pretrain", *TINY_DATA, "+model.kwargs.blocks_per_stage=1"]
    )
    net = build_model(cfg.model, num_classes=10)
    module = ClassifierModule(
        net,
        typed(OptimConfig, cfg.task.optim, "task.optim"),
        typed(SchedulerConfig, cfg.task.scheduler, "task.scheduler"),
        hparams=plain(cfg),
    )
    dm = build_datamodule(cfg.data, mean=net.arch.mean, std=net.arch.std, seed=0)
    trainer = _trainer(1)
    trainer.fit(module, datamodule=dm)
    path = folder / "pretrain.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAMORPH_SHARED", str(d / "no-shared"))
        mp.setenv("METAMORPH_CACHE", str(d / "cache"))
        yield d


@pytest.fixture(scope="module")
def ckpt(workdir) -> Path:
    return make_metamorph_checkpoint(workdir / "mm")


@pytest.fixture(scope="module")
def module(ckpt):
    return load_metamorphic(ckpt)


def sample_cfg(out_dir: Path, *overrides: str):
    return compose_config("sample", out_dir, [*TINY_DATA, "threads=1", *overrides])


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def x_batch(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Sampling by ratio and shape
# ----------------------------------------------------------------------------------------------


def test_gamma_sample_writes_loadable_files(ckpt, module, tmp_path):
    out = tmp_path / "models" / "r14_g05"
    s = sample.run(sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", f"out={out}", "k=1"))
    assert files_in(tmp_path / "models") == ["r14_g05.json", "r14_g05.safetensors"]
    assert s["model"] == str(out) + ".json" and s["target"] == "gamma" and s["k"] == 1
    net = module.net
    hidden = net.shape_for_gamma(0.5)
    assert s["hidden"] == hidden == [[8, 8], [16, 16], [32, 32]]
    model = metamorph.load(s["model"])
    assert model.arch.hidden == hidden and model.arch.bn is False
    assert s["params"] == sum(p.numel() for p in model.parameters())
    assert model.meta["checkpoint"] == str(ckpt) and model.meta["shape"] == hidden
    assert model.meta["gamma"] == pytest.approx(0.5) and model.meta["k"] == 1
    assert model.meta["ema"] is True
    x = x_batch()
    with torch.no_grad():
        ref = net(x, hidden, module.emit_eval(hidden, k=1, seed=0))  # the in-memory emission
        live = net(x, hidden, net.emit(hidden))  # the live (non-EMA) INR
        got = model(x)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert not torch.allclose(got, live, atol=1e-6)  # the EMA weights were used


def test_bn_images_on_a_folded_checkpoint_is_a_clear_error(ckpt, tmp_path):
    assert not load_metamorphic(ckpt).net.base_arch.bn_blocks
    cfg = sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", "bn_images=64", f"out={tmp_path / 'x'}")
    with pytest.raises(ValueError, match="keeps no BatchNorm.*drop bn_images"):
        sample.run(cfg)
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.safetensors").exists()


def test_hidden_target_with_fewer_blocks(ckpt, module, tmp_path):
    out = tmp_path / "custom"
    shape = [[16, 3], [32], [50, 100]]  # 100 > 64: an unseen width above the pretrained one
    s = sample.run(
        sample_cfg(tmp_path, f"ckpt={ckpt}", f"hidden='{json.dumps(shape)}'", f"out={out}")
    )
    model = metamorph.load(out.with_suffix(".json"))
    assert s["hidden"] == shape and model.arch.hidden == shape and s["seen"] is False
    x = x_batch()
    with torch.no_grad():
        ref = module.net(x, shape, module.emit_eval(shape))
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)


def test_k_sample_averaging_is_used(ckpt, module, tmp_path):
    assert module.cfg.coord_noise > 0
    hidden = module.net.shape_for_gamma(0.25)
    paths = {}
    for k in (1, 4):
        out = tmp_path / f"k{k}"
        s = sample.run(sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.25", f"out={out}", f"k={k}"))
        assert s["k"] == k
        paths[k] = metamorph.load(s["model"])
    assert paths[4].meta["k"] == 4
    w1, w4 = paths[1].state_dict(), paths[4].state_dict()
    emitted = module.emit_eval(hidden, k=4, seed=0)
    assert emitted
    for name, t in emitted.items():
        assert torch.equal(w4[name], t)  # exactly the K=4 evaluation emission
    assert any(not torch.allclose(w1[n], w4[n]) for n in emitted)
    frozen = [n for n in w1 if n not in emitted]
    assert frozen and all(torch.equal(w1[n], w4[n]) for n in frozen)


def test_materialize_matches_functional_forward(module):
    hidden = [[16, 12], [20, 32], [64]]
    model = materialize(module, hidden, k=2, seed=3)
    x = x_batch(3)
    with torch.no_grad():
        ref = module.net(x, hidden, module.emit_eval(hidden, k=2, seed=3))
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# ONNX and torch.export
# ----------------------------------------------------------------------------------------------


def test_onnx_export_matches_pytorch(ckpt, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx" / "r14"
    s = sample.run(sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.3", f"out={out}", "format=onnx"))
    assert s["onnx_max_abs_diff"] < 1e-4
    assert files_in(out.parent) == ["r14.json", "r14.onnx", "r14.safetensors"]
    model = metamorph.load(s["model"])
    sess = ort.InferenceSession(str(out) + ".onnx", providers=["CPUExecutionProvider"])
    x = x_batch(5, seed=7).sigmoid()  # [0, 1] images; a batch size other than the export's
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    mean = torch.tensor(model.arch.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.arch.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model((x - mean) / std)  # the graph normalises by itself
    assert (got - ref).abs().max().item() < 1e-4
    assert model.meta["input"]["normalize_in_graph"] is True


def test_torch_export_program_round_trips(ckpt, tmp_path):
    out = tmp_path / "pt2" / "r14"
    s = sample.run(
        sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", "depth=1", f"out={out}", "format=export")
    )
    assert s["hidden"] == [[8], [16], [32]] and s["export_max_abs_diff"] < 1e-5
    assert files_in(out.parent) == ["r14.json", "r14.pt2", "r14.safetensors"]
    program = torch.export.load(str(out) + ".pt2")
    model = metamorph.load(s["model"])
    x = x_batch(3, seed=9).sigmoid()  # [0, 1] images: the program normalises them itself
    mean = torch.tensor(model.arch.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.arch.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model((x - mean) / std)
        torch.testing.assert_close(program.module()(x), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------


def _val(module, tmp_path, n=20):
    cfg = sample_cfg(tmp_path, "ckpt=x", "out=y")
    arch = module.net.base_arch
    dm = build_datamodule(cfg.data, mean=arch.mean, std=arch.std, seed=0)
    dm.setup("fit")
    return val_batches(dm, "val", n)


def test_budget_choice_is_within_budget_and_most_accurate(module, tmp_path):
    net = module.net
    full_params = sum(t.numel() for t in net.template(net.full_shape).parameters())
    budget = Budget(max_params=int(0.5 * full_params))
    cands = candidate_shapes(net, gamma_step=0.1, max_gamma=0.9, n_random=4, seed=0)
    labels = [c.label for c in cands]
    assert len(set(json.dumps(c.hidden) for c in cands)) == len(cands)  # no duplicates
    assert "g0" in labels and "min" in labels and any(lab.endswith("-d1") for lab in labels)
    assert sum(lab.startswith("rand") for lab in labels) >= 1
    best, cands = select_for_budget(module, cands, budget, _val(module, tmp_path), k=1)
    within = [c for c in cands if c.within_budget]
    assert 0 < len(within) < len(cands)
    assert best in within and best.params <= budget.max_params
    assert all(c.params <= budget.max_params for c in within)
    assert all(c.acc is not None for c in within)  # every shape within budget was evaluated
    assert all(c.acc is None and c.fails == ["params"] for c in cands if not c.within_budget)
    assert best.acc == max(c.acc for c in within)
    ties = [c for c in within if c.acc == best.acc]
    assert best.flops == min(c.flops for c in ties)  # ties go to the cheaper shape


def test_latency_is_predicted_only_after_cheap_filters_and_chosen_measured(module, tmp_path):
    from metamorph.devices import Measurement, MemoryEstimate, Timing
    from metamorph.export.sample import shape_flops

    net = module.net

    class FakePredictor:  # deterministic: 1 ms per 1,000 hidden channels... of the shape
        calls = 0

        def predict(self, arch):
            FakePredictor.calls += 1
            return sum(map(sum, arch.hidden)) / 1000

    measured = []

    def fake_measure(model):
        ms = sum(map(sum, model.arch.hidden)) / 1000
        measured.append(model.arch.hidden)
        mem = MemoryEstimate(1, 0, 1, 1, 1)
        return Measurement({"name": "fake"}, Timing(ms, ms, ms, 5, 1), 0, 0, mem, None, "", {}, "")

    limit = int(0.6 * shape_flops(net, net.full_shape))
    budget = Budget(max_flops=limit, max_latency_ms=1e6)
    cands = candidate_shapes(net, gamma_step=0.3, max_gamma=0.9, n_random=0)
    best, cands = select_for_budget(
        module,
        cands,
        budget,
        _val(module, tmp_path, 10),
        k=1,
        predictor=FakePredictor(),
        measure=fake_measure,
    )
    for c in cands:
        if c.flops > limit:
            assert c.predicted_latency_ms is None and c.acc is None and c.fails == ["flops"]
        else:
            assert c.predicted_latency_ms > 0 and c.within_budget
    assert FakePredictor.calls == sum(c.flops <= limit for c in cands)
    assert best.flops <= limit and measured == [best.hidden]  # only the chosen one measured
    assert best.measured_latency_ms == sum(map(sum, best.hidden)) / 1000


def test_latency_budget_final_check_runs_in_a_fresh_process_on_the_model_file(
    module, tmp_path, monkeypatch
):
    """select_for_budget's default end-to-end check is metamorph.devices.fresh.measure_deployed:
    the chosen shape written as a model file and measured as metamorph-profile measures it."""
    from metamorph.devices import Timing
    from metamorph.devices import fresh as fresh_mod
    from metamorph.devices import measure as measure_mod

    seen = []

    def spawn(args, timeout):  # the child, run here; what it measured is a model file
        from contextlib import redirect_stdout
        from io import StringIO

        seen.append(json.loads(Path(args[0]).read_text())["arch"]["hidden"])
        out = StringIO()
        with redirect_stdout(out):
            fresh_mod.main(args)
        return out.getvalue()

    fake = lambda m, xs, p, t: Timing(1.0, 1.0, 1.0, 5, 1)  # noqa: E731
    monkeypatch.setitem(measure_mod.TIMERS, "torch_cpu", fake)
    monkeypatch.setattr(fresh_mod, "_spawn", spawn)

    class FakePredictor:
        def predict(self, arch):
            return 0.5

    cands = candidate_shapes(module.net, gamma_step=0.45, max_gamma=0.9, n_random=0)
    best, _ = select_for_budget(
        module,
        cands,
        Budget(max_latency_ms=2.0, device="cpu1_b1"),
        _val(module, tmp_path, 10),
        k=1,
        predictor=FakePredictor(),
    )
    # the budget's latency_repeats (3) fresh processes, the slowest figure kept
    assert seen == [best.hidden] * 3 and best.measured.extra["process_medians_ms"] == [1.0] * 3
    assert best.measured.extra["measured_in"].startswith(fresh_mod.HOW)


def test_budget_cli_reports_choice(ckpt, tmp_path, capsys):
    out = tmp_path / "b" / "r14_budget"
    cfg = sample_cfg(
        tmp_path,
        f"ckpt={ckpt}",
        f"out={out}",
        "budget.max_params=90000",
        "search.gamma_step=0.2",
        "search.random_shapes=2",
        "val_subset=16",
    )
    s = sample.run(cfg)
    assert s["target"] == "budget" and s["params"] <= 90000
    assert s["val_images"] == 16 and 0 < s["met_budget"] < s["candidates"]
    assert s["budget"] == {"max_params": 90000}
    model = metamorph.load(s["model"])
    assert sum(p.numel() for p in model.parameters()) == s["params"]
    assert model.meta["chosen"] == s["chosen"] and model.meta["val_acc"] == s["val_acc"]
    printed = capsys.readouterr().out
    assert "candidate shapes" in printed and "met the budget" in printed


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error and no files
# ----------------------------------------------------------------------------------------------


def _expect_error(tmp_path, exc, match, *overrides):
    out_dir = tmp_path / "bad"
    cfg = sample_cfg(tmp_path, *overrides, f"out={out_dir / 'x'}")
    with pytest.raises(exc, match=match):
        sample.run(cfg)
    assert files_in(out_dir) == []


def test_bad_ratio_and_widths(ckpt, tmp_path):
    for g in ("1.0", "1.5", "-0.1"):
        _expect_error(
            tmp_path, ValueError, r"gamma=.* outside \[0, 1\)", f"ckpt={ckpt}", f"gamma={g}"
        )
    _expect_error(
        tmp_path,
        ValueError,
        r"width 0 of layer1.1 is outside the supported range 1\.\.32",
        f"ckpt={ckpt}",
        "hidden=[[16,0],[32,32],[64,64]]",
    )
    _expect_error(
        tmp_path,
        ValueError,
        r"width 129 of layer3.0 is outside the supported range 1\.\.128",
        f"ckpt={ckpt}",
        "hidden=[[16,16],[32,32],[129,64]]",
    )
    _expect_error(tmp_path, ValueError, "exactly one target", f"ckpt={ckpt}")
    _expect_error(
        tmp_path,
        ValueError,
        "depth= applies only with gamma=",
        f"ckpt={ckpt}",
        "hidden=[[1]]",
        "depth=1",
    )
    _expect_error(
        tmp_path,
        ValueError,
        r"depth 0 of stage 1 is outside 1\.\.2",
        f"ckpt={ckpt}",
        "gamma=0.5",
        "depth=0",
    )
    _expect_error(
        tmp_path,
        ValueError,
        "exactly one target",
        f"ckpt={ckpt}",
        "gamma=0.5",
        "budget.max_params=9",
    )


def test_impossible_budget_names_smallest_cost(ckpt, module, tmp_path):
    from metamorph.export.sample import smallest_shape

    small = sum(t.numel() for t in module.net.template(smallest_shape(module.net)).parameters())
    _expect_error(
        tmp_path,
        ValueError,
        rf"no shape meets the budget.*smallest achievable is {small:,} params",
        f"ckpt={ckpt}",
        "budget.max_params=100",
        "search.gamma_step=0.3",
        "search.random_shapes=0",
    )


def test_wrong_kind_and_corrupt_checkpoints(ckpt, workdir, tmp_path):
    pre = make_pretrain_checkpoint(workdir / "pretrain")
    _expect_error(
        tmp_path, ValueError, "plain task=pretrain checkpoint", f"ckpt={pre}", "gamma=0.5"
    )
    model_file = workdir / "plain"
    metamorph.io.save_model(metamorph.create_model("resnet20", blocks_per_stage=1), model_file)
    for p in (f"{model_file}.json", f"{model_file}.safetensors"):
        _expect_error(tmp_path, ValueError, "plain model file", f"ckpt={p}", "gamma=0.5")
    data = ckpt.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path, ValueError, "truncated, corrupt", f"ckpt={cut}", "gamma=0.5")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(random.Random(0).randbytes(4096))
    _expect_error(tmp_path, ValueError, "truncated, corrupt", f"ckpt={junk}", "gamma=0.5")
    _expect_error(
        tmp_path, FileNotFoundError, "not found", f"ckpt={tmp_path / 'nope.ckpt'}", "gamma=0.5"
    )


def test_model_files_are_recognised_by_content_not_by_chance(ckpt, workdir, tmp_path):
    """Renamed model files are still named as such; junk that merely starts like JSON or has a
    '{' where a safetensors header would begin is reported as corrupt."""
    model_file = workdir / "plain_renamed"
    metamorph.io.save_model(metamorph.create_model("resnet20", blocks_per_stage=1), model_file)
    for suffix in (".json", ".safetensors"):
        renamed = tmp_path / f"model{suffix}.ckpt"
        renamed.write_bytes(Path(f"{model_file}{suffix}").read_bytes())
        _expect_error(tmp_path, ValueError, "plain model file", f"ckpt={renamed}", "gamma=0.5")
    noise = random.Random(1).randbytes(4096)
    for name, data in (
        ("brace.ckpt", b"{" + noise),
        ("header.ckpt", noise[:8] + b'{"' + noise),
    ):
        junk = tmp_path / name
        junk.write_bytes(data)
        _expect_error(tmp_path, ValueError, "truncated, corrupt", f"ckpt={junk}", "gamma=0.5")


def test_unwritable_output(ckpt, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", f"out={blocker / 'sub' / 'm'}")
    with pytest.raises(NotADirectoryError, match="cannot be written.*a_file is a file"):
        sample.run(cfg)
    assert blocker.read_text() == "not a folder"
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            cfg = sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", f"out={ro / 'm'}")
            with pytest.raises(PermissionError, match="not writable"):
                sample.run(cfg)
            assert files_in(ro) == []
        finally:
            ro.chmod(0o755)


def test_failed_check_leaves_no_files(ckpt, tmp_path, monkeypatch):
    """A failure after some outputs were written (here: the ONNX check) leaves nothing."""
    monkeypatch.setattr(sample, "check_onnx", lambda *a, **kw: 0.5)
    out_dir = tmp_path / "new" / "folder"
    cfg = sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", f"out={out_dir / 'm'}", "format=onnx")
    with pytest.raises(ValueError, match="ONNX export's logits differ"):
        sample.run(cfg)
    assert not (tmp_path / "new").exists()  # not even the folders created for the output


def test_console_script_errors_exit_nonzero_without_files(ckpt, tmp_path):
    out_dir = tmp_path / "cli"
    out_dir.mkdir()
    proc = subprocess.run(
        [
            *script_cmd_sample(),
            f"ckpt={ckpt}",
            "gamma=1.5",
            f"out={out_dir / 'm'}",
            *TINY_DATA,
        ],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "metamorph-sample: error: compression ratio gamma=1.5 is outside [0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_in(out_dir) == []
    assert files_in(tmp_path) == ["cli"]  # no Hydra run folder or log either


def script_cmd_sample() -> list[str]:
    try:
        return script_cmd("metamorph-sample")
    except KeyError:  # no console script installed and conftest does not know the module
        import sys

        return [sys.executable, "-m", "metamorph.cli.sample"]


def test_console_script_success_prints_json_last(ckpt, tmp_path):
    out = tmp_path / "ok" / "m"
    proc = subprocess.run(
        [*script_cmd_sample(), f"ckpt={ckpt}", "gamma=0.25", f"out={out}", *TINY_DATA],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    s = json.loads(lines[-1])
    assert s["model"] == str(out) + ".json" and s["gamma"] == pytest.approx(0.25)
    assert "[metamorph-sample]" in proc.stdout
    assert metamorph.load(s["model"]).arch.hidden == [[12, 12], [24, 24], [48, 48]]


# ----------------------------------------------------------------------------------------------
# metamorph-eval on a metamorphic checkpoint
# ----------------------------------------------------------------------------------------------


def _eval_cfg(tmp_path, *overrides):
    return compose_config(
        "eval",
        tmp_path,
        [
            *TINY_DATA,
            "split=val",
            "device=cpu",
            "latency_threads=1",
            "sweep.latency_min_run_time=0.01",
            *overrides,
        ],
    )


def test_metamorphic_eval_sweep_writes_csv_markdown_and_plots(ckpt, tmp_path):
    base_csv = tmp_path / "slim.csv"
    base_csv.write_text("gamma,acc,params\n0,12,170000\n0.5,10,90000\n0.75,9,45000\n")
    out = tmp_path / "sweep_out"
    s = evaluate.run(
        _eval_cfg(
            tmp_path,
            f"src={ckpt}",
            f"out_dir={out}",
            "sweep.gammas=[0,0.5,0.75]",
            "sweep.depths=[1]",
            "sweep.k=2",
            f"baselines=[slim:{base_csv}]",
        )
    )
    assert s["kind"] == "metamorphic" and s["k"] == 2 and s["images"] == 20
    assert s["baselines"] == ["slim"]
    names = files_in(out)
    assert names == [
        "acc_vs_flops.png",
        "acc_vs_gamma.png",
        "acc_vs_latency.png",
        "flops_vs_gamma.png",
        "latency_vs_gamma.png",
        "params_vs_gamma.png",
        "sweep.csv",
        "sweep.md",
    ]
    for png in (n for n in names if n.endswith(".png")):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and (out / png).stat().st_size > 5000
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == ["g0", "g0.5", "g0.75", "depth1"]
    # trained widths [0.5, 1] x full: gamma 0.75 is unseen; depth 1 is a trained depth choice
    assert [r["seen"] for r in rows] == ["True", "True", "False", "True"]
    params = [int(r["params"]) for r in rows[:3]]
    flops = [int(r["flops"]) for r in rows[:3]]
    assert params == sorted(params, reverse=True) and flops == sorted(flops, reverse=True)
    assert all(float(r["latency_ms"]) > 0 for r in rows)
    for r in rows:  # the latency's interquartile range, plotted as bars
        assert float(r["latency_q1_ms"]) <= float(r["latency_ms"]) <= float(r["latency_q3_ms"])
    assert all(0 <= float(r["acc"]) <= 100 for r in rows)
    md = (out / "sweep.md").read_text()
    assert "| g0.75 | 0.750 | unseen |" in md and "K=2" in md
    assert s["points"][0]["acc"] == pytest.approx(float(rows[0]["acc"]), abs=1e-3)


def test_metamorphic_eval_rejects_bad_baseline_without_files(ckpt, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ratio,accuracy\n0,1\n")
    out = tmp_path / "sweep_bad"
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['acc', 'gamma'\]"):
        evaluate.run(_eval_cfg(tmp_path, f"src={ckpt}", f"out_dir={out}", f"baselines=[b:{bad}]"))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        evaluate.run(
            _eval_cfg(
                tmp_path, f"src={ckpt}", f"out_dir={out}", "sweep.gammas=[0,1.2]", "latency=false"
            )
        )
    assert files_in(out) == []


def test_calibrated_sample_and_sweep(ckpt, module, tmp_path):
    from metamorph.export.sample import calibrate_emitted, prepared_stats

    out = tmp_path / "models" / "cal"
    s = sample.run(
        sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", f"out={out}", "k=1", "calibrate=16")
    )
    model = metamorph.load(s["model"])
    assert model.meta["calibrated_on"] == 16
    plain = materialize(module, module.net.shape_for_gamma(0.5), k=1)
    x = x_batch()
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x), atol=1e-4)  # calibration changed it
    # the prepared network is its own fixed point
    prepared = module.net.prepared_network()
    xs = x_batch(16, seed=5)
    before = copy.deepcopy(prepared)
    calibrate_emitted(prepared, module.net, xs, prepared_stats(module.net, xs))
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), before(x), rtol=1e-4, atol=1e-4)
    sw = tmp_path / "sweep_cal"
    r = evaluate.run(
        _eval_cfg(
            tmp_path, f"src={ckpt}", f"out_dir={sw}", "sweep.gammas=[0,0.5]", "sweep.calibrate=16"
        )
    )
    assert [p["label"] for p in r["points"]] == ["g0", "g0.5"]
    assert "calibrated on 16 train images" in (sw / "sweep.md").read_text()
    with pytest.raises(ValueError, match="calibrate=-1"):
        evaluate.run(
            _eval_cfg(tmp_path, f"src={ckpt}", f"out_dir={tmp_path / 'x'}", "sweep.calibrate=-1")
        )
