"""Bespoke: segments of the traced teacher (single-entry / single-exit; replacing one by itself
changes nothing), alternatives and the assembled student (declared latency entries, shapes, the
chain equals the plain network), simulated annealing (never an infeasible state as feasible),
preprocessing that resumes without retraining finished alternatives, the search through
metamorph-customize (never over budget; bad budgets and missing public checkpoints: clear errors,
nothing written) and the retraining task. Tiny synthetic networks, the embedded mini data, latency
faked where it is timed."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import QUIET, TINY_DATA, compose_config, randomize_bn, write_akamaster_checkpoint

from metamorph.cli import train
from metamorph.devices import BudgetError
from metamorph.io.model_file import load_model, save_model
from metamorph.methods.bespoke import customize as cust
from metamorph.methods.bespoke import preprocess as pre
from metamorph.methods.bespoke.anneal import Choice, anneal
from metamorph.methods.bespoke.features import FeatureCache
from metamorph.methods.bespoke.house import (
    build_alternative,
    enumerate_segments,
    load_public,
    sample_house,
    self_replacement,
    single_value_cuts,
    trace_blocks,
)
from metamorph.methods.bespoke.student import (
    assemble,
    chain,
    declared_latency,
    latency_entries,
    run_from,
)
from metamorph.models.resnet_cifar import CifarResNet, cifar_resnet_arch
from metamorph.models.segments import block_names
from metamorph.runtime.checkpoints import checkpoint_kind, load_checkpoint
from metamorph.runtime.customizers import get_customizer, list_customizers

KINDS = ["teacher_run", "public_run", "pruned", "lowrank"]
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tiny(depth: int = 14, seed: int = 0) -> CifarResNet:
    torch.manual_seed(seed)
    net = CifarResNet(cifar_resnet_arch(depth=depth))  # the public networks' widths
    return randomize_bn(net, seed).eval()


def test_every_segment_is_single_entry_exit_and_replacing_it_by_itself_changes_nothing():
    teacher = tiny(20)
    cuts = single_value_cuts(trace_blocks(teacher))
    assert set(cuts) == set(block_names(teacher.arch)) and all(cuts.values())
    segs = enumerate_segments(teacher, 1, 3)
    assert len(segs) == 3 * (3 + 2 + 1)  # runs of 1..3 blocks in each 3-block stage
    assert all(s.length <= 3 for s in segs)
    with torch.no_grad():
        ref = teacher(X)
        for seg in segs:
            spec = self_replacement(seg, teacher)
            units = chain(
                teacher, {(seg.start, seg.stop): (spec.id, build_alternative(spec, teacher, {}))}
            )
            student = assemble(teacher, units)
            assert student.arch.hidden == teacher.arch.hidden
            torch.testing.assert_close(student(X), ref, rtol=0, atol=1e-5)
            # the same from the cached boundary activation (the search's incremental path)
            h = teacher(X, stop=seg.start)
            torch.testing.assert_close(
                run_from(teacher, units, h, seg.start), ref, rtol=0, atol=1e-5
            )
    with pytest.raises(ValueError, match="min_len"):
        enumerate_segments(teacher, 3, 2)


def test_a_value_live_across_blocks_is_not_a_cut():
    import torch.fx as fx

    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_module("layer1.0", (x,))
    b = g.call_module("layer1.1", (a,))
    c = g.call_function(torch.add, (a, b))  # a skip over layer1.1: two values live across it
    g.output(c)
    cuts = single_value_cuts(g)
    assert cuts == {"layer1.0": True, "layer1.1": False}


@pytest.fixture(scope="module")
def public_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("public")
    write_akamaster_checkpoint(d / "resnet20-synthetic.th", depth=20, seed=5)
    return d


def test_assembled_students_have_their_latency_entries_and_shapes(public_dir):
    teacher = tiny(20)
    public = load_public(["resnet20"], public_dir)
    segs = enumerate_segments(teacher, 2, 3)
    specs = sample_house(teacher, public, segs, 3, 0, KINDS, [0.5], [0.5], seed=0)
    assert {s.kind for s in specs} == set(KINDS)
    table = {"stem_head": 0.5, **{f"block:{i}": 1.0 + i for i in range(9)}}
    for spec in specs:
        alt = build_alternative(spec, teacher, public)
        table[f"alt:{spec.id}"] = 0.25
        a, b = spec.segment
        units = chain(teacher, {(a, b): (spec.id, alt)})
        entries = latency_entries(units)
        assert entries == [
            "stem_head",
            *[f"block:{i}" for i in range(a)],
            f"alt:{spec.id}",
            *[f"block:{i}" for i in range(b, 9)],
        ]
        expect = 0.5 + sum(1.0 + i for i in range(9) if not a <= i < b) + 0.25
        assert declared_latency(units, table) == pytest.approx(expect)
        student = assemble(teacher, units)
        s = next(k for k in range(3) if sum(len(h) for h in teacher.arch.hidden[: k + 1]) > a)
        depth = [len(h) for h in student.arch.hidden]
        want = [3, 3, 3]
        want[s] = 3 - (b - a) + len(alt)
        assert depth == want, spec.id
        if spec.kind == "pruned":  # half the hidden channels of the replaced blocks kept
            w = teacher.arch.stage_widths[s]
            assert sorted(student.arch.hidden[s]) == sorted([w // 2] * (b - a) + [w] * (3 - b + a))
        with torch.no_grad():
            out = student(X)
            assert out.shape == (3, 10)
            h = teacher(X, stop=a)
            torch.testing.assert_close(run_from(teacher, units, h, a), out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="overlap"):
        sp = [s for s in specs if s.segment == [0, 2]][:1] + [
            s for s in specs if s.segment[0] == 1
        ][:1]
        chain(teacher, {tuple(s.segment): (s.id, torch.nn.Identity()) for s in sp})


def test_missing_public_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no resnet32-\*\.th in .*public=\[\]"):
        load_public(["resnet32"], tmp_path)
    with pytest.raises(ValueError, match="public_dir is not set"):
        load_public(["resnet20"], None)
    with pytest.raises(ValueError, match="unknown public network"):
        load_public(["vgg"], tmp_path)


def test_annealing_never_reports_an_infeasible_state_as_feasible():
    rng = random.Random(0)
    choices = []
    for k in range(30):
        a = rng.randrange(0, 20)
        choices.append(Choice(f"c{k}", a, a + rng.randrange(1, 4), -rng.uniform(0.1, 2.0)))
    acc = {c.id: rng.uniform(50, 90) for c in choices}

    def accuracy(state):  # more replacements, lower accuracy; deterministic
        return 90 - sum(90 - acc[i] for i in state) / 3

    by = {c.id: c for c in choices}
    for budget in (9.0, 7.0, 5.0):
        res = anneal(choices, accuracy, 10.0, budget, acc, 90.0, steps=200, seed=1)
        for _score, state in res.ranked:
            ids = sorted(state)
            assert 10.0 + sum(by[i].delta_ms for i in ids) <= budget
            for i in ids:  # non-overlapping
                assert all(not by[i].overlaps(by[j]) for j in ids if j != i)
        for t in res.trace:
            assert t["feasible"] == (t["latency_ms"] <= budget)
        assert res.best is not None and res.best == res.ranked[0][1]
        assert [t["temperature"] for t in res.trace[1:3]] == pytest.approx([1.0, 0.97])
    few = [Choice(f"c{k}", 3 * k, 3 * k + 2, -0.1) for k in range(3)]  # at best 9.7 ms
    impossible = anneal(few, lambda s: 80.0, 10.0, 9.5, {c.id: 80.0 for c in few}, 90.0, steps=50)
    assert impossible.best is None and impossible.ranked == []
    with pytest.raises(ValueError, match="positive"):
        anneal(choices, accuracy, 10.0, -1.0, acc, 90.0)


def test_killed_preprocessing_resumes_without_retraining_finished_alternatives(
    tmp_path, monkeypatch
):
    teacher = tiny(14)
    specs = sample_house(
        teacher,
        {},
        enumerate_segments(teacher, 2, 2),
        2,
        0,
        ["teacher_run", "pruned"],
        [0.5],
        [0.5],
    )
    assert len(specs) >= 4
    cache = FeatureCache(tmp_path / "features")
    cache.fill(teacher, torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    calls, kill = [], True
    real = pre.train_alternative

    def counting(module, *a, **k):
        calls.append(1)
        if len(calls) == 3 and kill:
            raise RuntimeError("killed")  # the run dies during the third alternative
        return real(module, *a, **k)

    monkeypatch.setattr(pre, "train_alternative", counting)

    def modules():
        return {s.id: build_alternative(s, teacher, {}) for s in specs}

    with pytest.raises(RuntimeError, match="killed"):
        pre.train_house(tmp_path, specs, modules(), cache, 1, 8, 1e-3, log=lambda s: None)
    done = sorted((tmp_path / "alternatives").glob("*.safetensors"))
    assert len(done) == 2 and not list((tmp_path / "alternatives").glob("*.tmp"))
    calls.clear()
    kill = False
    mods = modules()
    res = pre.train_house(tmp_path, specs, mods, cache, 1, 8, 1e-3, log=lambda s: None)
    assert len(calls) == len(specs) - 2
    assert sum(r["resumed"] for r in res.values()) == 2 and len(res) == len(specs)
    # a resumed alternative holds the weights its file has
    again = modules()
    for s in specs:
        pre.read_result(pre.result_path(tmp_path, s), again[s.id])
        for k, v in again[s.id].state_dict().items():
            torch.testing.assert_close(v, mods[s.id].state_dict()[k])


# ----------------------------------------------------------------------------------------------
# Through the tasks and metamorph-customize
# ----------------------------------------------------------------------------------------------


def fake_timer(module, x, profile, min_run_time=None):
    """Latency = parameters / 1000 ms (+0.05): monotone in size, no timing."""
    n = sum(p.numel() for p in module.parameters())
    return SimpleNamespace(median_ms=0.05 + n / 1000.0)


@pytest.fixture(scope="module")
def house(tmp_path_factory, public_dir):
    root = tmp_path_factory.mktemp("bespoke")
    teacher = tiny(14)
    tfile = save_model(teacher, root / "teacher")
    mp = pytest.MonkeyPatch()
    mp.setattr(pre, "time_module", fake_timer)
    try:
        cfg = compose_config(
            "train",
            root,
            [
                *TINY_DATA,
                "task=bespoke_preprocess",
                f"task.teacher={tfile}",
                f"task.out={root / 'house'}",
                "task.house.public=[resnet20]",
                f"task.house.public_dir={public_dir}",
                "task.house.max_len=2",
                "task.house.per_segment=3",
                "task.mimic.images=16",
                "task.mimic.proxy_images=20",
                "task.mimic.epochs=1",
            ],
        )
        summary = train.run(cfg)
    finally:
        mp.undo()
    return root, tfile, summary


def test_preprocessing_task_writes_the_house(house):
    root, _, s = house
    assert s["alternatives"] == len(list((root / "house" / "alternatives").glob("*.safetensors")))
    assert s["resumed"] == 0 and s["trained_now"] == s["alternatives"]
    table = json.loads((root / "house" / "latency.json").read_text())
    assert table["_profile"] == "cpu1_b1" and "stem_head" in table and "block:5" in table
    assert pre.TEACHER_E2E in table


def fake_measure(scale: float = 1.0):
    def measure(model, profile):
        ms = fake_timer(model, None, profile).median_ms * scale
        return SimpleNamespace(
            latency_ms=ms, memory_mb=0.1, latency=SimpleNamespace(iqr_ms=0.0), to_dict=dict
        )

    return measure


def _customize(house, tmp_path, *overrides):
    root, _, _ = house
    cfg = compose_config(
        "customize",
        tmp_path,
        [
            *TINY_DATA,
            "method=bespoke",
            f"bespoke.house={root / 'house'}",
            f"out={tmp_path / 'out' / 'student'}",
            "bespoke.anneal.steps=25",
            "bespoke.onnx=false",
            "bespoke.calibrate=false",
            *overrides,
        ],
    )
    return get_customizer("bespoke")(cfg)


def test_customizer_is_registered():
    assert "bespoke" in list_customizers()


def test_search_returns_a_student_within_budget(house, tmp_path, monkeypatch):
    monkeypatch.setattr(cust, "measure_model", fake_measure())
    root, tfile, _ = house
    teacher_ms = fake_timer(load_model(tfile), None, None).median_ms
    s = _customize(house, tmp_path, f"budget.max_latency_ms={teacher_ms * 0.8}")
    assert s["measured_latency_ms"] <= teacher_ms * 0.8 and s["replacements"]
    net = load_model(s["model_file"])
    with torch.no_grad():
        assert net(X).shape == (3, 10)
    trace = json.loads(Path(s["trace"]).read_text())["trace"]
    assert len(trace) >= 2 and {"score", "latency_ms", "temperature"} <= set(trace[0])
    assert Path(s["trace_plot"]).is_file()
    assert "test_acc_before_retrain" in s and s["test_images"] == 20
    only = _customize(
        house,
        tmp_path / "t",
        f"budget.max_latency_ms={teacher_ms * 0.8}",
        "bespoke.teacher_only=true",
    )
    assert all("public_run" not in r for r in only["replacements"])


def test_bad_budgets_fail_clearly_and_write_nothing(house, tmp_path, monkeypatch):
    monkeypatch.setattr(cust, "measure_model", fake_measure())
    teacher_ms = fake_timer(load_model(house[1]), None, None).median_ms
    with pytest.raises(ValueError, match="give budget.max_latency_ms"):
        _customize(house, tmp_path)
    with pytest.raises(ValueError, match="must be a positive number"):
        _customize(house, tmp_path, "budget.max_latency_ms=-1")
    with pytest.raises(
        BudgetError, match="no replacement set .* within budget.max_latency_ms=0.001"
    ):
        _customize(house, tmp_path, "budget.max_latency_ms=0.001")
    with pytest.raises(ValueError, match="latency table is on cpu1_b1"):
        _customize(house, tmp_path, "budget.max_latency_ms=1", "device=cpu2_b32")
    # every feasible state measures over budget end to end: refused, not returned
    monkeypatch.setattr(cust, "measure_model", fake_measure(scale=100.0))
    with pytest.raises(BudgetError, match="all over budget"):
        _customize(house, tmp_path, f"budget.max_latency_ms={teacher_ms * 0.8}")
    assert not (tmp_path / "out").exists()


def test_retraining_distils_the_student_and_resumes(house, tmp_path, monkeypatch):
    monkeypatch.setattr(cust, "measure_model", fake_measure())
    root, tfile, _ = house
    teacher_ms = fake_timer(load_model(tfile), None, None).median_ms
    s = _customize(house, tmp_path / "c", f"budget.max_latency_ms={teacher_ms * 0.8}")
    args = [
        *TINY_DATA,
        *QUIET,
        "task=bespoke_retrain",
        f"task.student={s['model_file']}",
        f"task.teacher={tfile}",
        "task.onnx=false",
        "trainer.max_epochs=10",
        "+trainer.limit_val_batches=1",
        "callbacks.last_checkpoint.every_n_train_steps=1",
    ]
    first = train.run(compose_config("train", tmp_path / "r", [*args, "trainer.max_steps=2"]))
    assert (
        first["global_step"] == 2 and "test_acc_before" in first and first["test/acc"] is not None
    )
    back = load_model(first["model_file"])
    assert back.arch.hidden == load_model(s["model_file"]).arch.hidden
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    assert checkpoint_kind(last) == "bespoke_retrain"
    assert isinstance(load_checkpoint(last), CifarResNet)
    again = train.run(
        compose_config(
            "train",
            tmp_path / "r",
            [*args, "trainer.max_steps=3", "test=false", f"ckpt_path={last}"],
        )
    )
    assert again["global_step"] == 3
    with pytest.raises(ValueError, match="task.student= is required"):
        train.run(compose_config("train", tmp_path / "x", [*TINY_DATA, "task=bespoke_retrain"]))
