"""metamorph-compare: points of several methods on one table and two charts, missing methods
reported, points from another device profile / split / machine refused. Tiny synthetic models
on 20 embedded test images; latency timed for a few milliseconds only."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from metamorph.compare import (
    Candidate,
    ComparisonError,
    Found,
    read_points,
    register_point_source,
    run_comparison,
    write_points,
)
from metamorph.compare.device import machine_fingerprint, profile
from metamorph.models import create_model

REPO = Path(__file__).resolve().parents[1]
DATA = {
    "name": "cifar10",
    "root": "embedded:cifar10-mini",
    "train_subset": 48,
    "val_size": 20,
    "test_subset": 20,
    "batch_size": 16,
    "eval_batch_size": 20,
}


def tiny(width: int, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return create_model(
        "resnet20", stage_widths=[4, 8, 8], blocks_per_stage=1, hidden_width=[4, 8, width]
    ).eval()


@dataclass
class FakeOptions:
    widths: list[int] = field(default_factory=lambda: [8, 6, 4])
    trained_min: int = 6  # narrower widths are unseen
    series: str = "width"


def _fake(opts: FakeOptions, ctx) -> Found:
    def candidates():
        for i, w in enumerate(opts.widths):
            yield Candidate(
                opts.series,
                {"width": w},
                tiny(w, seed=i),
                seen=w >= opts.trained_min,
                make_s=0.001 * (i + 1),
            )

    return Found(candidates(), make_what="fake emission", notes=["synthetic"])


register_point_source("test_fake_a", options=FakeOptions)(_fake)
register_point_source("test_fake_b", options=FakeOptions)(_fake)


def comparison_cfg(tmp_path: Path, methods: dict, **extra) -> OmegaConf:
    return OmegaConf.create(
        {
            "data": DATA,
            "out_dir": str(tmp_path / "out"),
            "device": "cpu",
            "seed": 0,
            "latency_min_run_time": 0.01,
            "comparison": {
                "name": "tiny",
                "base": "tiny resnet",
                "split": "test",
                "profile": "cpu1_b1",
                "methods": methods,
                **extra,
            },
        }
    )


TWO_FAKES = {
    "a": {
        "source": "test_fake_a",
        "label": "Method A",
        "cost": {"one_time_hours": 1.5, "one_time_on": "2-core CPU", "source": "test record"},
    },
    "b": {
        "source": "test_fake_b",
        "label": "Method B",
        "args": {"widths": [8, 5], "series": "shape"},
    },
}


@pytest.fixture(scope="module")
def two_methods(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    summary = run_comparison(comparison_cfg(tmp, TWO_FAKES), log=lambda *_: None)
    return tmp / "out", summary


def test_two_methods_write_table_and_both_charts(two_methods):
    out, s = two_methods
    assert s["methods"] == 2 and s["points"] == 5 and s["missing"] == 0
    for name in ("comparison.csv", "comparison.md", "acc_vs_flops.png", "acc_vs_latency.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert [r["method"] for r in rows] == ["a"] * 3 + ["b"] * 2
    assert {r["status"] for r in rows} == {"ok"}
    assert [r["seen"] for r in rows] == ["seen", "seen", "unseen", "seen", "unseen"]
    for r in rows:
        assert 0.0 <= float(r["acc"]) <= 100.0
        assert int(r["params"]) > 0 and int(r["flops"]) > 0
        assert float(r["latency_ms"]) > 0 and float(r["latency_iqr_ms"]) >= 0
        assert r["profile"] == "cpu1_b1" and r["split"] == "test" and r["images"] == "20"
        assert r["machine"] == machine_fingerprint(profile("cpu1_b1"))
    # narrower networks: fewer parameters and FLOPs
    a = [r for r in rows if r["method"] == "a"]
    assert int(a[0]["flops"]) > int(a[1]["flops"]) > int(a[2]["flops"])
    md = (out / "comparison.md").read_text()
    assert md.count("| Method A |") >= 3 and md.count("| Method B |") >= 2
    assert "Protocol `v1:top1-plain-network:test:20`" in md
    assert "2 methods, 5 points, 0 missing." in md
    assert "1.5 h (2-core CPU)" in md and "test record" in md  # cited cost
    assert "0.00 s measured (fake emission)" in md  # measured time to a new target
    assert "not recorded" in md  # method B has no one-time cost: said so, not invented
    for png in ("acc_vs_flops.png", "acc_vs_latency.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
            assert len(set(im.convert("RGB").getdata())) > 10  # not blank
    # each method's points round-trip through the points CSV
    pts = read_points(out / "points" / "a.csv")
    assert len(pts) == 3 and pts[2].seen is False and pts[0].make_s == pytest.approx(0.001)
    assert read_points(out / "comparison.csv", "b")[1].descriptor == '{"width":5}'


def test_charts_hold_one_series_per_method_with_seen_marks(two_methods, tmp_path, monkeypatch):
    """The plotted data: one legend entry per method, unseen points drawn open, IQR bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metamorph.compare.report import MethodResult, plot

    out, _ = two_methods
    results = [
        MethodResult(k, lab, "x", points=read_points(out / "points" / f"{k}.csv"))
        for k, lab in (("a", "Method A"), ("b", "Method B"))
    ]
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    plot(results, "latency", tmp_path / "lat.png")
    ax = figs[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:2] == ["Method A", "Method B"] and "open: unseen shape" in labels
    faces = [ln.get_markerfacecolor() for ln in ax.lines if ln.get_marker() not in ("None", None)]
    assert "none" in faces  # unseen: open markers
    assert len(ax.collections) >= 5  # one IQR error bar per point


def test_missing_method_is_reported_not_dropped(tmp_path):
    methods = {
        "a": TWO_FAKES["a"],
        "gone": {
            "source": "model_files",
            "label": "Gone",
            "args": {"files": [str(tmp_path / "nope.json")], "remake": "make-it --now"},
        },
    }
    s = run_comparison(comparison_cfg(tmp_path, methods), log=lambda *_: None)
    assert s["missing"] == 1 and s["points"] == 3
    assert "nope.json not found; make them with: make-it --now" in s["missing_methods"]["gone"]
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    gone = [r for r in rows if r["method"] == "gone"]
    assert len(gone) == 1 and gone[0]["status"].startswith("missing: model file(s)")
    md = (out / "comparison.md").read_text()
    assert "| Gone | missing: model file(s)" in md and "2 methods, 3 points, 1 missing." in md
    assert len(read_points(out / "comparison.csv")) == 3  # report rows are not points


@pytest.mark.parametrize(
    "change, word",
    [
        ({"profile": "cpu4_b8"}, "profile"),
        ({"split": "val"}, "split"),
        ({"machine": "0123456789ab"}, "machine"),
        ({"protocol": "v0:other"}, "protocol"),
    ],
)
def test_points_from_another_setting_are_refused(two_methods, tmp_path, change, word):
    out, _ = two_methods
    pts = [replace(q, **change) for q in read_points(out / "points" / "a.csv")]
    bad = tmp_path / "bad.csv"
    write_points(pts, bad)
    methods = {"a": {**TWO_FAKES["a"], "points": str(bad)}, "b": TWO_FAKES["b"]}
    with pytest.raises(ComparisonError, match=f"{word} .*cannot share a chart"):
        run_comparison(comparison_cfg(tmp_path, methods), log=lambda *_: None)
    assert not (tmp_path / "out").exists()  # nothing written


def test_points_file_of_the_same_setting_is_used(two_methods, tmp_path):
    out, _ = two_methods
    methods = {"a": {**TWO_FAKES["a"], "points": str(out / "points" / "a.csv")}}
    s = run_comparison(comparison_cfg(tmp_path, methods), log=lambda *_: None)
    assert s["points"] == 3 and s["missing"] == 0
    assert "points from" in (tmp_path / "out" / "comparison.md").read_text()


def test_a_missing_points_file_is_evaluated_and_written(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "a.csv"
    methods = {"a": {**TWO_FAKES["a"], "points": str(cache)}}
    s = run_comparison(comparison_cfg(tmp_path, methods), log=lambda *_: None)
    assert s["points"] == 3 and str(cache) in s["files"]
    first = read_points(cache)
    # the second run reads the file instead of evaluating the source
    import metamorph.compare.context as context

    monkeypatch.setattr(context.Context, "measure", lambda *a: pytest.fail("re-evaluated"))
    run_comparison(comparison_cfg(tmp_path, methods), log=lambda *_: None)
    assert read_points(tmp_path / "out" / "comparison.csv") == first


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown point source 'nope'.*metamorphic"):
        run_comparison(comparison_cfg(tmp_path, {"x": {"source": "nope"}}), log=print)
    with pytest.raises(ValueError, match="cost.source"):
        cfg = {"source": "test_fake_a", "cost": {"one_time_hours": 2.0}}
        run_comparison(comparison_cfg(tmp_path, {"x": cfg}), log=print)
    with pytest.raises(ValueError, match="(?s)widht.*Valid keys: widths"):
        cfg = {"source": "test_fake_a", "args": {"widht": [8]}}
        run_comparison(comparison_cfg(tmp_path, {"x": cfg}), log=print)
    with pytest.raises(ValueError, match="unknown device profile 'cpu9'.*cpu1_b1"):
        run_comparison(comparison_cfg(tmp_path, TWO_FAKES, profile="cpu9"), log=print)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_b64.*needs a GPU"):
            run_comparison(comparison_cfg(tmp_path, TWO_FAKES, profile="cuda_b64"), log=print)
    with pytest.raises(ComparisonError, match="comparison=<name>"):
        run_comparison(OmegaConf.create({"out_dir": str(tmp_path)}), log=print)


def test_console_script_on_model_files_and_pruning(tmp_path):
    """``metamorph-compare`` end to end through Hydra with two built-in sources on synthetic
    model files: individually made model files and L1 pruning of a base network."""
    from metamorph.io.model_file import save_model

    models = tmp_path / "models"
    models.mkdir()
    for w in (8, 4):
        save_model(tiny(w), models / f"net_w{w}")
    conf = tmp_path / "conf" / "comparison"
    conf.mkdir(parents=True)
    cfg = {
        "comparison": {
            "name": "tiny_cli",
            "base": "tiny",
            "profile": "cpu1_b1",
            "methods": {
                "files": {
                    "source": "model_files",
                    "args": {"files": [str(models / "net_w*.json")]},
                },
                "pruned": {
                    "source": "pruning",
                    "args": {
                        "base": str(models / "net_w8.json"),
                        "blocks": ["layer3.0"],
                        "gammas": [0.0, 0.5],
                    },
                },
                "later": {"source": "slimmable", "args": {"ckpt": str(tmp_path / "none.ckpt")}},
            },
        }
    }
    (conf / "tiny_cli.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml(cfg))
    out = tmp_path / "out"
    overrides = [f"data.{k}={v}" for k, v in DATA.items()] + [
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "comparison=tiny_cli",
        f"out_dir={out}",
        "device=cpu",
        "latency_min_run_time=0.01",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {"METAMORPH_SHARED": str(tmp_path / "no-shared"), "OMP_NUM_THREADS": "1"}

    r = subprocess.run(
        [sys.executable, "-m", "metamorph.cli.compare", *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **env},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["points"] == 4 and summary["missing"] == 1
    assert "slimmable checkpoint" in summary["missing_methods"]["later"]
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    pruned = [r for r in rows if r["method"] == "pruned"]
    assert [json.loads(r["descriptor"])["hidden"][2] for r in pruned] == [[8], [4]]
    assert all(r["seen"] == "n/a" for r in pruned)
    # gamma 0 pruning is the base network itself: same accuracy as its model file
    base = next(r for r in rows if r["method"] == "files" and "net_w8" in r["descriptor"])
    assert pruned[0]["acc"] == base["acc"]
    assert "missing: slimmable checkpoint" in r.stdout


def test_metamorphic_source_measures_the_sampled_networks(tmp_path, monkeypatch):
    """A tiny task=metamorph checkpoint through the checkpoint registry: each swept shape is
    the network metamorph-sample would ship, its accuracy that of the sweep's emission, seen /
    unseen as the trained range says, and the emission timed."""
    from test_sample import make_metamorph_checkpoint

    from metamorph.export.sample import load_metamorphic
    from metamorph.export.sweep import run_sweep
    from metamorph.runtime.data import build_datamodule

    monkeypatch.setenv("METAMORPH_SHARED", str(tmp_path / "no-shared"))
    ckpt = make_metamorph_checkpoint(tmp_path / "mm", steps=1)
    args = {"ckpt": str(ckpt), "gammas": [0.0, 0.75], "depths": [1], "k": 1}
    methods = {"mm": {"source": "metamorphic", "label": "MM", "args": args}}
    s = run_comparison(comparison_cfg(tmp_path, methods), log=lambda *_: None)
    assert s["points"] == 3 and s["missing"] == 0
    pts = read_points(tmp_path / "out" / "points" / "mm.csv")
    assert [q.series for q in pts] == ["width", "width", "depth"]
    assert [q.seen for q in pts] == [True, False, True]  # trained widths [0.5, 1] x pretrained
    assert all(q.make_s is not None and q.make_s > 0 for q in pts)
    assert pts[0].flops > pts[1].flops and pts[0].flops > pts[2].flops
    module = load_metamorphic(ckpt)
    dm = build_datamodule(OmegaConf.create(DATA), seed=0)
    dm.setup()
    dm.set_normalization(module.net.base_arch.mean, module.net.base_arch.std)
    rows = run_sweep(
        module,
        list(dm.normalized_batches("test")),
        gammas=[0.0, 0.75],
        depths=[1],
        k=1,
        latency=False,
    )
    for q, r in zip(pts, rows):
        assert abs(q.acc - r.acc) <= 100 / 20 + 1e-6  # within one of the 20 test images
        assert q.params == r.params and q.flops == r.flops
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "emission + fold (metamorph-sample)" in md and "EMA INR, K=1" in md


def test_slimmable_source_through_the_checkpoint_registry(tmp_path, monkeypatch):
    """A tiny trained slimmable checkpoint: one point per width, BN recalibrated, the widths the
    slimmable network was trained at seen and the narrower one unseen."""
    from conftest import compose_config
    from test_baselines import LAST, TINY_RUN, tiny_net

    import metamorph
    from metamorph.cli.train import run
    from metamorph.io.model_file import save_model

    monkeypatch.setenv("METAMORPH_SHARED", str(tmp_path / "no-shared"))
    base = save_model(tiny_net(seed=4), tmp_path / "base")
    overrides = [
        "task=slimmable",
        *TINY_RUN,
        f"model.init={base}",
        f"task.blocks=[{LAST}]",
        "task.calib_batches=2",
        "task.val_calib_batches=1",
    ]
    summary = run(compose_config("train", tmp_path / "slim", overrides))
    args = {"ckpt": summary["checkpoint"], "gammas": [0.0, 0.5, 0.75], "calib_batches": 2}
    methods = {"slim": {"source": "slimmable", "args": args}}
    s = run_comparison(comparison_cfg(tmp_path, methods), log=lambda *_: None)
    assert s["points"] == 3 and s["missing"] == 0
    pts = read_points(tmp_path / "out" / "points" / "slim.csv")
    assert [q.seen for q in pts] == [True, True, False]  # trained ratios [0.5, 1]
    for q, g in zip(pts, (0.0, 0.5, 0.75)):
        exported = metamorph.load(summary["models"][f"g{g:g}"])
        assert json.loads(q.descriptor)["hidden"] == exported.arch.hidden
        assert q.params == sum(p.numel() for p in exported.parameters())
        assert q.make_s > 0 and q.artefact == summary["checkpoint"]
    with pytest.raises(ValueError, match="is a slimmable checkpoint, not a metamorphic"):
        wrong = {"w": {"source": "metamorphic", "args": {"ckpt": summary["checkpoint"]}}}
        run_comparison(comparison_cfg(tmp_path, wrong), log=lambda *_: None)


def test_genecai_source_reads_a_search_folder(tmp_path):
    """A GeneCAI run folder (front.csv, baseline.csv, models/): the front and the uniform-L1
    networks as two series; model files found in models/ after the folder was moved."""
    from metamorph.io.model_file import save_model

    run_dir = tmp_path / "search"
    (run_dir / "models").mkdir(parents=True)
    rows = {"front.csv": [("front_0", 6)], "baseline.csv": [("baseline_0", 4)]}
    for name, items in rows.items():
        with open(run_dir / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["name", "flops_ratio", "model_file"])
            for stem, width in items:
                save_model(tiny(width), run_dir / "models" / stem)
                w.writerow([stem, 0.9, f"/elsewhere/models/{stem}.json"])  # moved since
    methods = {"g": {"source": "genecai", "label": "GeneCAI", "args": {"run_dir": str(run_dir)}}}
    s = run_comparison(comparison_cfg(tmp_path, methods), log=lambda *_: None)
    assert s["points"] == 2
    pts = read_points(tmp_path / "out" / "points" / "g.csv")
    assert [q.series for q in pts] == ["front", "uniform L1 + fine-tune"]
    assert [json.loads(q.descriptor)["name"] for q in pts] == ["front_0", "baseline_0"]
    assert all(q.seen is None for q in pts)
    assert "GeneCAI" in (tmp_path / "out" / "comparison.md").read_text()
    gone = {"g": {"source": "genecai", "args": {"run_dir": str(tmp_path / "nope")}}}
    s = run_comparison(comparison_cfg(tmp_path, gone), log=lambda *_: None)
    assert "GeneCAI search folder" in s["missing_methods"]["g"]


def test_model_files_describe_a_network_without_resnet_widths(tmp_path):
    """A model file of another family (a ViT, a stitched descendant) is a point like any other:
    described by its file, not refused for lacking ResNet hidden widths."""
    from metamorph.compare.sources.model_files import _descriptor
    from metamorph.io.model_file import save_model
    from metamorph.models import create_model

    path = save_model(create_model("vit_tiny_c10"), tmp_path / "vit")
    assert _descriptor(create_model("vit_tiny_c10"), path, {"file": "vit"}) == {"file": "vit"}
    net = tiny(4)
    assert _descriptor(net, save_model(net, tmp_path / "r"))["hidden"] == net.arch.hidden
