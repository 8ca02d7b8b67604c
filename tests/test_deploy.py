"""The deployer's path (issue 22): exported graphs that take raw images, targets a checkpoint
cannot serve, strict keys with and without ``+``, the Python API, one-line errors that leave
nothing behind, ``--help`` / ``--version``.

The entry points run in-process (``main()`` with a patched ``sys.argv``), on the tiny metamorphic
checkpoint of ``test_sample`` (ResNet-14, every block metamorphic, depth choices [1, 2]).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DATA
from test_sample import files_in, make_metamorph_checkpoint, sample_cfg

import metamorph
from metamorph.cli import evaluate, sample
from metamorph.config.locations import CONF_DIR
from metamorph.config.strict import UnknownKeyError, check_overrides
from metamorph.data.transforms import normalize
from metamorph.export.sample import load_metamorphic, materialize, shape_for_target

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAMORPH_SHARED", str(d / "no-shared"))
        mp.setenv("METAMORPH_CACHE", str(d / "cache"))
        yield d


@pytest.fixture(scope="module")
def ckpt(workdir) -> Path:
    return make_metamorph_checkpoint(workdir / "mm")


@pytest.fixture(scope="module")
def dm(workdir, ckpt):
    from metamorph.runtime.data import build_datamodule

    cfg = sample_cfg(workdir, f"ckpt={ckpt}")
    net = load_metamorphic(ckpt).net
    d = build_datamodule(cfg.data, mean=net.base_arch.mean, std=net.base_arch.std, seed=0)
    d.setup("fit")
    return d


def run_main(monkeypatch, capsys, main, *argv: str) -> tuple[int, str, str]:
    """Run an entry point in-process; (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------
# 1. exported graphs take images as users have them
# ----------------------------------------------------------------------------------------------


def test_onnx_on_raw_images_matches_the_pytorch_pipeline(ckpt, dm, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from metamorph.export.formats import read_onnx_input_spec

    out = tmp_path / "r14"
    s = sample.run(sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", f"out={out}", "format=onnx"))
    model = metamorph.load(s["model"])
    x, _ = dm.split_tensors("test")  # uint8 pixels, as decoded from the JPEGs
    raw = x.float() / 255.0
    sess = ort.InferenceSession(str(out) + ".onnx", providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input": raw.numpy()})[0])
    with torch.no_grad():
        ref = model(dm.transform_batch(x))  # the pipeline: normalise, then the network
    assert (got - ref).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(1), ref.argmax(1))
    # without the normalisation the same pixels give other logits: the graph does normalise
    with torch.no_grad():
        assert (model(raw) - ref).abs().max().item() > 1e-2
    spec = read_onnx_input_spec(str(out) + ".onnx")
    assert spec["layout"] == "NCHW" and spec["size"] == [3, 32, 32]
    assert spec["normalize_in_graph"] is True and spec["range"].startswith("[0, 1]")
    assert spec["mean"] == pytest.approx(list(model.arch.mean))
    assert spec["class_names"] == dm.classes
    assert json.loads(Path(s["model"]).read_text())["meta"]["input"] == spec


def test_normalize_in_graph_false_exports_the_bare_network(ckpt, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from metamorph.export.formats import read_onnx_input_spec

    out = tmp_path / "bare"
    cfg = sample_cfg(
        tmp_path,
        f"ckpt={ckpt}",
        "gamma=0.25",
        f"out={out}",
        "format=onnx",
        "export.normalize_in_graph=false",
    )
    s = sample.run(cfg)
    assert s["onnx_max_abs_diff"] < 1e-4
    model = metamorph.load(s["model"])
    xn = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    sess = ort.InferenceSession(str(out) + ".onnx", providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input": xn.numpy()})[0])
    with torch.no_grad():
        assert (got - model(xn)).abs().max().item() < 1e-4
    spec = read_onnx_input_spec(str(out) + ".onnx")
    assert spec["normalize_in_graph"] is False and "normalised" in spec["range"]


def test_torch_export_program_normalises_raw_images(ckpt, dm, tmp_path):
    out = tmp_path / "p"
    s = sample.run(sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", f"out={out}", "format=export"))
    program = torch.export.load(str(out) + ".pt2")
    model = metamorph.load(s["model"])
    x, _ = dm.split_tensors("test")
    with torch.no_grad():
        got = program.module()(x.float() / 255.0)
        ref = model(normalize(x, model.arch.mean, model.arch.std))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# 2. a target the checkpoint cannot serve fails with the reason and the valid choices
# ----------------------------------------------------------------------------------------------


def test_depth_on_a_fixed_depth_checkpoint_is_refused(ckpt):
    module = copy.deepcopy(load_metamorphic(ckpt))
    net = module.net
    net.spec.depth_choices = []  # as a last-block (NeuMeta) checkpoint: trained at fixed depth
    with pytest.raises(ValueError, match=r"fixed depth.*valid depths.*\[2, 2, 2\]"):
        shape_for_target(net, gamma=0.5, depth=1)
    with pytest.raises(ValueError, match="fixed depth"):
        shape_for_target(net, hidden=[[16], [32, 32], [64, 64]])
    assert shape_for_target(net, gamma=0.5, depth=2) == net.shape_for_gamma(0.5)


def test_depth_above_the_network_or_wrong_length_is_refused(ckpt):
    net = load_metamorphic(ckpt).net
    with pytest.raises(ValueError, match="depth 3 of stage 1"):
        shape_for_target(net, gamma=0.5, depth=3)  # was silently cut to 2
    with pytest.raises(ValueError, match="gives 2 stages; the network has 3"):
        shape_for_target(net, gamma=0.5, depth=[1, 2])
    h = shape_for_target(net, gamma=0.5, depth=[1, 2, 1])
    assert [len(s) for s in h] == [1, 2, 1]  # exactly the shape asked for


# ----------------------------------------------------------------------------------------------
# 3. unknown keys, with or without +, name the closest valid key
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, override, closest",
    [
        ("sample", "gama=0.5", "gamma"),
        ("sample", "+calibrat=1280", "calibrate"),
        ("sample", "+data.bath_size=3", "batch_size"),
        ("sample", "++budget.max_flop=1e6", "max_flops"),
        ("eval", "sweep.gamas=[0.5]", "gammas"),
        ("eval", "+latency_thread=2", "latency_threads"),
        ("train", "+trainer.max_epoch=1", "max_epochs"),
        ("train", "+task.optim.lrr=0.1", "lr"),
        ("bench", "+repeat=3", "repeats"),
        ("convert", "+fold_b=true", "fold_bn"),
        ("search", "+thread=2", "threads"),
    ],
)
def test_unknown_keys_are_refused_with_the_closest_valid_key(config, override, closest):
    with pytest.raises(UnknownKeyError, match=f"did you mean `{closest}`") as e:
        check_overrides(CONF_DIR, config, [override])
    assert "Valid keys" in str(e.value)


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("sample", ["gamma=0.5", "calibrate=8", "data.batch_size=3", "+data.test_subset=5"]),
        ("train", ["+trainer.limit_train_batches=2", "+model.kwargs.blocks_per_stage=1"]),
        ("train", ["task=metamorph", "task.scope.blocks=[all]", "+task.optim.betas=[0.9,0.99]"]),
        ("train", ["-m", "seed=0,1", "hydra/launcher=basic", "hydra.run.dir=/tmp/x"]),
    ],
)
def test_valid_keys_and_additions_pass(config, overrides):
    check_overrides(CONF_DIR, config, [o for o in overrides if not o.startswith("-")])


def test_a_typo_exits_2_before_anything_runs(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m"
    code, _, err = run_main(
        monkeypatch, capsys, sample.main, f"ckpt={ckpt}", "gamma=0.5", f"out={out}", "+calibrat=8"
    )
    assert code == 2 and "did you mean `calibrate`" in err and "Traceback" not in err
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    "choice, expected",
    [
        ("experiment=finetune/resnet2", "did you mean `finetune/resnet20_cifar10`"),
        ("experiment=finetune_resnet20", "renamed: use experiment=finetune/resnet20_cifar10"),
        ("data=cifar11", "did you mean `cifar10`"),
    ],
)
def test_an_unknown_or_renamed_group_choice_exits_2_naming_the_fix(
    choice, expected, tmp_path, monkeypatch, capsys
):
    from metamorph.cli import train

    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(monkeypatch, capsys, train.main, choice)
    assert code == 2 and expected in err and "Traceback" not in err
    assert files_in(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# 4. the Python API
# ----------------------------------------------------------------------------------------------


def test_python_api_sample_sweep_and_save(ckpt, dm, tmp_path):
    mm = metamorph.load_metamorphic(ckpt)
    assert isinstance(mm, metamorph.Metamorphic) and "layer3.1" in mm.blocks
    net = mm.sample(gamma=0.5)
    ref = materialize(mm.module, mm.net.shape_for_gamma(0.5), k=mm.k, seed=0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=0, rtol=0)
    assert net.meta["gamma"] == pytest.approx(0.5) and net.meta["target"] == "gamma"
    shape = [[16, 8], [32], [40, 64]]
    assert mm.sample(hidden=shape).arch.hidden == shape
    small = mm.sample(budget={"max_params": 60_000}, data=dm, val_subset=16)
    assert sum(p.numel() for p in small.parameters()) <= 60_000
    assert small.meta["target"] == "budget" and small.meta["val_acc"] is not None
    rows = mm.sweep(gammas=[0.0, 0.5], data=dm)
    assert [r["gamma"] for r in rows] == [0.0, 0.5] and all(0 <= r["acc"] <= 100 for r in rows)
    files = mm.save(net, tmp_path / "api_g05")
    assert sorted(p.name for p in files) == ["api_g05.json", "api_g05.safetensors"]
    assert metamorph.load(tmp_path / "api_g05.json").arch.hidden == net.arch.hidden
    with pytest.raises(ValueError, match="exactly one target"):
        mm.sample(gamma=0.5, hidden=shape)
    with pytest.raises(ValueError, match="needs data"):
        mm.sample(budget={"max_flops": 1e6})


def test_metamorph_load_of_a_checkpoint_says_what_to_call(ckpt):
    with pytest.raises(ValueError, match=r"metamorph\.load_metamorphic\(.*\.sample\(gamma"):
        metamorph.load(ckpt)


# ----------------------------------------------------------------------------------------------
# 5. clean errors, nothing left behind
# ----------------------------------------------------------------------------------------------


def test_eval_of_a_directory_is_one_line_and_leaves_no_run_folder(
    ckpt, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "runs" / "eval"
    code, _, err = run_main(
        monkeypatch,
        capsys,
        evaluate.main,
        f"src={ckpt.parent}",
        *TINY_DATA,
        f"hydra.run.dir={run_dir}",
    )
    assert code == 2 and "is a directory" in err and "metamorph.ckpt" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not run_dir.exists()


def test_sample_without_out_names_the_option(ckpt, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, sample.main, f"ckpt={ckpt}", "gamma=0.5")
    assert code == 2 and "missing required option out=" in err and "output prefix" in err
    assert "MissingMandatoryValue" not in err and "Traceback" not in err


def test_a_failed_sweep_leaves_no_run_folder(ckpt, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "runs" / "sweep"
    code, _, err = run_main(
        monkeypatch,
        capsys,
        evaluate.main,
        f"src={ckpt}",
        *TINY_DATA,
        "sweep.gammas=[1.5]",
        f"hydra.run.dir={run_dir}",
    )
    assert code == 2 and "sweep.gammas" in err and not run_dir.exists()


def test_eval_log_is_not_empty(ckpt, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "runs" / "ok"
    code, out, _ = run_main(
        monkeypatch,
        capsys,
        evaluate.main,
        f"src={ckpt}",
        *TINY_DATA,
        "sweep.gammas=[0.0]",
        "latency=false",
        f"hydra.run.dir={run_dir}",
    )
    assert code == 0
    logs = list(run_dir.glob("*.log"))
    assert logs and "| shape |" in logs[0].read_text()


# ----------------------------------------------------------------------------------------------
# 6. --help and --version
# ----------------------------------------------------------------------------------------------


def test_help_shows_options_with_comments_and_an_example(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, sample.main, "--help")
    assert code == 0
    assert "standalone network" in out  # what it does
    assert "gamma: null" in out and "uniform compression ratio" in out  # option + its comment
    assert "metamorph-sample ckpt=" in out  # an example
    assert "experiment" not in out and "finetune" not in out  # no training groups
    code, out, _ = run_main(monkeypatch, capsys, sample.main, "--version")
    assert code == 0 and out.startswith(f"metamorph {metamorph.__version__}")


# ----------------------------------------------------------------------------------------------
# 7. plots that answer the deployment question
# ----------------------------------------------------------------------------------------------


def test_accuracy_vs_cost_plots_and_titles(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metamorph.export.plots import count, plot_accuracy_vs_cost, sweep_title
    from metamorph.export.sweep import Baseline

    rows = [
        dict(
            label="g0",
            gamma=0.0,
            seen=True,
            acc=80.0,
            flops=4e7,
            latency_ms=1.0,
            latency_q1_ms=0.9,
            latency_q3_ms=1.2,
        ),
        dict(
            label="g0.75",
            gamma=0.75,
            seen=False,
            acc=40.0,
            flops=1e7,
            latency_ms=0.4,
            latency_q1_ms=0.35,
            latency_q3_ms=0.5,
        ),
    ]
    base = Baseline("pruned", Path("p.csv"), [dict(gamma=0.5, acc=30.0, flops=2e7)])
    title = sweep_title("outputs/quickstart/metamorph/metamorph.ckpt", "cifar10", "test", 10000, 1)
    assert title == "metamorph/metamorph.ckpt: cifar10/test (10,000 images), K=1"
    seen_axes = []
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **kw):
        seen_axes.append(fig.axes[0])
        return real_savefig(fig, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", spy)
        for cost in ("flops", "latency_ms"):
            out = plot_accuracy_vs_cost(rows, cost, tmp_path / f"{cost}.png", [base], title)
            assert out.read_bytes()[:4] == b"\x89PNG"
    flops_ax, lat_ax = seen_axes
    assert flops_ax.get_xlim()[0] == 0 and lat_ax.get_xlim()[0] == 0  # cost axes from zero
    assert flops_ax.get_title() == title
    labels = [t.get_text() for t in flops_ax.get_legend().get_texts()]
    assert "seen in training" in labels and "unseen" in labels and "pruned" in labels
    assert "pruned" not in [t.get_text() for t in lat_ax.get_legend().get_texts()]  # no latency
    assert lat_ax.containers and lat_ax.containers[0].has_xerr  # IQR bars
    assert plot_accuracy_vs_cost([dict(label="g0", acc=1.0)], "latency_ms", tmp_path / "n") is None
    assert count(1, "thread") == "1 thread" and count(2, "thread") == "2 threads"


def test_sampled_network_accuracy_is_reported_when_data_is_loaded(ckpt, dm, tmp_path):
    from metamorph.hypernet.evaluate import batch_accuracy

    out = tmp_path / "cal"
    logs: list[str] = []
    s = sample.run(
        sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", "calibrate=8", f"out={out}"),
        log=logs.append,
    )
    model = metamorph.load(s["model"])
    x, y = dm.split_tensors("test")
    want = batch_accuracy(model, dm.normalized_batches((x, y)))
    assert s["accuracy"] == {
        "acc": round(want, 3),
        "split": "test",
        "data": "cifar10",
        "images": 20,
    }
    plain = sample.run(sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", f"out={out}_p"))
    assert "accuracy" not in plain  # no data asked for, none loaded
    given = sample.run(
        sample_cfg(tmp_path, f"ckpt={ckpt}", "gamma=0.5", f"out={out}_g"), data_given=True
    )
    assert given["accuracy"]["split"] == "test"


def test_budget_search_shows_progress(ckpt, tmp_path):
    logs: list[str] = []
    sample.run(
        sample_cfg(
            tmp_path,
            f"ckpt={ckpt}",
            "budget.max_params=80000",
            "search.gamma_step=0.25",
            "search.random_shapes=0",
            "val_subset=8",
            f"out={tmp_path / 'b'}",
        ),
        log=logs.append,
    )
    steps = [line for line in logs if line.strip().startswith("[") and "/" in line.split()[0]]
    assert steps and steps[0].strip().startswith("[1/") and "s left" in steps[-1]


def test_one_rounding_rule_and_width_above_full():
    from metamorph.export.plots import gamma_label, ratio_text

    assert ratio_text(-1.0) == "width x2.0" and ratio_text(-0.25) == "width x1.25"
    assert ratio_text(1 - 34 / 64) == "gamma 0.469" and gamma_label(1 - 34 / 64) == "g0.469"
    assert gamma_label(0.0) == "g0" and gamma_label(0.5) == "g0.5"


def test_bench_prints_an_estimate_of_its_duration(tmp_path, capsys):
    from conftest import compose_config

    from metamorph.cli import bench

    tiny = ["hypernet.hidden=16", "hypernet.layers=2", "hypernet.freqs=4", "threads=1"]
    tiny += ["batch_size=4", "repeats=1", "warmup=0", "train=false", "memory=false"]
    tiny += ["k_values=[1]", "matmul_size=64", "matmul_rows=256", "models=[resnet20]"]
    s = bench.run(compose_config("bench", tmp_path, tiny))
    out = capsys.readouterr().out
    assert "estimated duration: about" in out and s["estimated_s"] > 0
    with_memory = compose_config("bench", tmp_path, [*tiny[:-1], "memory=true", "train=true"])
    nets = {"r20": bench.build_metanet("resnet20", bench.INRConfig(hidden=16, layers=2, freqs=4))}
    slow = bench.estimate_seconds(with_memory, nets, torch.device("cpu"), [1])
    assert slow > s["estimated_s"]  # memory subprocesses and training steps add to it
