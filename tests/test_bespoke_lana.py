"""The LANA-style baseline in the Bespoke package: the integer program returns the brute-forced
optimum of small instances and refuses an impossible budget clearly; depthwise-separable blocks
(initialisation, model family round trip); a LANA house (every hand-designed alternative of every
block) searched through metamorph-customize method=bespoke bespoke.search=lana within budget.
Tiny synthetic networks, the embedded mini data, latency faked where it is timed."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_DATA, compose_config, randomize_bn
from torch import nn

from metamorph.cli import train
from metamorph.devices import BudgetError
from metamorph.io.model_file import load_model, save_model
from metamorph.methods.bespoke import customize as cust
from metamorph.methods.bespoke import preprocess as pre
from metamorph.methods.bespoke.house import enumerate_segments, sample_house
from metamorph.methods.bespoke.lana import (
    DWSEP_FAMILY,
    DWSepConv,
    InfeasibleBudget,
    Item,
    brute_force_select,
    dwsep_block,
    milp_select,
)
from metamorph.models.registry import model_family
from metamorph.models.resnet_cifar import CifarResNet, cifar_resnet_arch
from metamorph.runtime.customizers import get_customizer


def tiny(depth: int = 14, seed: int = 0) -> CifarResNet:
    torch.manual_seed(seed)
    return randomize_bn(CifarResNet(cifar_resnet_arch(depth=depth)), seed).eval()


def random_instance(rng: random.Random, n_blocks: int = 6):
    """Items over ``n_blocks`` blocks in two stages: one-block items and a few two-block ones,
    some identities (0 blocks), mostly faster than the segment, scores mostly negative."""
    items = []
    for blk in range(n_blocks):
        for k in range(rng.randint(1, 2)):
            items.append(
                Item(
                    f"b{blk}_{k}",
                    blk,
                    blk + 1,
                    -rng.uniform(0.0, 1.0),
                    rng.uniform(-3.0, 0.5),
                    rng.choice([0, 1]),
                )
            )
    for _ in range(2):
        a = rng.randrange(n_blocks - 1)
        items.append(
            Item(f"r{a}_{len(items)}", a, a + 2, -rng.uniform(0.5, 1.5), -rng.uniform(0, 4), 1)
        )
    return items


def test_milp_returns_the_brute_forced_optimum():
    stages = [(0, 3), (3, 6)]
    checked = 0
    for seed in range(12):
        rng = random.Random(seed)
        items = random_instance(rng)
        base = 6.0
        fastest = base + sum(it.delta_ms for it in items if it.delta_ms < 0)
        budget = rng.uniform(fastest + 0.3 * (base - fastest), base - 0.2)
        ref = brute_force_select(items, base, budget, stages)
        if ref is None:
            with pytest.raises(InfeasibleBudget):
                milp_select(items, base, budget, 6, stages)
            continue
        ids, score, lat = milp_select(items, base, budget, 6, stages)
        assert score == pytest.approx(ref[1], abs=1e-6)
        assert lat <= budget + 1e-9
        chosen = [it for it in items if it.id in ids]
        assert sum(it.score for it in chosen) == pytest.approx(score)
        for i, a in enumerate(chosen):  # one choice per block
            assert all(not (a.start < b.stop and b.start < a.stop) for b in chosen[i + 1 :])
        checked += 1
    assert checked >= 8


def test_milp_keeps_every_stage_non_empty():
    # identities are free and cost nothing: without the stage limit all three would be taken
    items = [Item(f"id{b}", b, b + 1, -1.0, 0.0, 0) for b in range(3)]
    ids, _, lat = milp_select(items, 3.5, 1.6, 3, [(0, 3)])
    assert len(ids) == 2 and lat == pytest.approx(1.5)
    with pytest.raises(InfeasibleBudget):
        milp_select(items, 3.5, 0.6, 3, [(0, 3)])


def test_an_impossible_budget_is_refused_clearly():
    items = [Item("a", 0, 1, -0.5, -1.0, 1), Item("b", 1, 2, -0.4, -1.0, 1)]
    with pytest.raises(InfeasibleBudget, match=r"budget 1\.000 ms .* at best 2\.100 ms"):
        milp_select(items, 3.0, 1.0, 2)
    with pytest.raises(ValueError, match="positive"):
        milp_select(items, 3.0, 0.0, 2)
    with pytest.raises(InfeasibleBudget, match="no alternative"):
        milp_select([], 3.0, 1.0, 2)
    assert milp_select([], 3.0, 4.0, 2) == (frozenset(), 0.0, 3.0)


def test_dwsep_initialisation_and_model_family():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, 2, 1, bias=False)
    with torch.no_grad():  # a conv that is exactly depthwise-separable is recovered exactly
        d, p = torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1)
        conv.weight.copy_(p * d.view(1, 4, 3, 3))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(DWSepConv.from_conv(conv)(x), conv(x), rtol=1e-4, atol=1e-4)
    teacher = tiny(14)
    net = tiny(14)
    net.layer2[0] = dwsep_block(teacher.layer2[0])
    assert model_family(net) == DWSEP_FAMILY
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in teacher.parameters())


def fake_timer(module, x, profile, min_run_time=None):
    n = sum(p.numel() for p in module.parameters())
    return SimpleNamespace(median_ms=0.05 + n / 1000.0)


def fake_measure(model, profile):
    ms = fake_timer(model, None, profile).median_ms
    return SimpleNamespace(
        latency_ms=ms, memory_mb=0.1, latency=SimpleNamespace(iqr_ms=0.0), to_dict=dict
    )


def test_lana_house_takes_every_candidate_of_every_block():
    teacher = tiny(14)
    segs = enumerate_segments(teacher, 1, 1)
    specs = sample_house(
        teacher, {}, segs, 1, 0, ["identity", "dwsep", "pruned"], [0.5], [], 0, False
    )
    entries = sum(1 for s in segs if s.entry)
    assert len(specs) == 3 * len(segs) - entries  # no identity for a stage's stride-2 entry
    assert len({s.id for s in specs}) == len(specs)


@pytest.fixture(scope="module")
def lana_house(tmp_path_factory):
    root = tmp_path_factory.mktemp("lana")
    tfile = save_model(tiny(14), root / "teacher")
    mp = pytest.MonkeyPatch()
    mp.setattr(pre, "time_module", fake_timer)
    try:
        summary = train.run(
            compose_config(
                "train",
                root,
                [
                    *TINY_DATA,
                    "task=bespoke_preprocess",
                    f"task.teacher={tfile}",
                    f"task.out={root / 'house'}",
                    "task.house.min_len=1",
                    "task.house.max_len=1",
                    "task.house.sample=false",
                    "task.house.kinds=[identity,dwsep,pruned]",
                    "task.house.keep_ratios=[0.5]",
                    "task.house.public=[]",
                    "task.mimic.images=16",
                    "task.mimic.proxy_images=20",
                    "task.mimic.epochs=1",
                ],
            )
        )
    finally:
        mp.undo()
    return root, tfile, summary


def _customize(root, tmp_path, *overrides):
    cfg = compose_config(
        "customize",
        tmp_path,
        [
            *TINY_DATA,
            "method=bespoke",
            "bespoke.search=lana",
            f"bespoke.house={root / 'house'}",
            f"out={tmp_path / 'out' / 'student'}",
            "bespoke.onnx=false",
            "bespoke.calibrate=false",
            *overrides,
        ],
    )
    return get_customizer("bespoke")(cfg)


def test_lana_search_through_customize(lana_house, tmp_path, monkeypatch):
    monkeypatch.setattr(cust, "measure_model", fake_measure)
    root, tfile, summary = lana_house
    assert summary["by_kind"]["dwsep"] == 6 and summary["by_kind"]["identity"] == 4
    teacher_ms = fake_timer(load_model(tfile), None, None).median_ms
    s = _customize(root, tmp_path, f"budget.max_latency_ms={teacher_ms * 0.7}")
    assert s["search"] == "lana" and s["measured_latency_ms"] <= teacher_ms * 0.7
    assert s["replacements"] and set(s["kinds"]) <= {"identity", "dwsep", "pruned"}
    net = load_model(s["model_file"])  # a dwsep student reloads through its family
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(BudgetError, match="bespoke.search=lana.*no selection"):
        _customize(root, tmp_path / "x", "budget.max_latency_ms=0.01")
    with pytest.raises(ValueError, match="latency_scale=-1.0 must be positive"):
        _customize(root, tmp_path / "z", "bespoke.latency_scale=-1", "budget.max_latency_ms=1")
    scaled = _customize(  # a given scale replaces the calibration: the teacher declares 2x
        root, tmp_path / "s", "bespoke.latency_scale=2", f"budget.max_latency_ms={teacher_ms}"
    )
    assert scaled["latency_scale"] == 2.0 and scaled["teacher_declared_ms"] > 1.9 * teacher_ms
    with pytest.raises(ValueError, match="bespoke.search='sa'"):
        _customize(root, tmp_path / "y", "bespoke.search=sa", "budget.max_latency_ms=1")
    assert not (tmp_path / "x" / "out").exists()


def test_plain_fine_tuning_needs_no_teacher(lana_house, tmp_path, monkeypatch):
    from conftest import QUIET

    monkeypatch.setattr(cust, "measure_model", fake_measure)
    root, tfile, _ = lana_house
    teacher_ms = fake_timer(load_model(tfile), None, None).median_ms
    s = _customize(root, tmp_path / "c", f"budget.max_latency_ms={teacher_ms * 0.8}")
    args = [
        *TINY_DATA,
        *QUIET,
        "task=bespoke_retrain",
        f"task.student={s['model_file']}",
        "task.onnx=false",
        "trainer.max_steps=2",
        "+trainer.limit_val_batches=1",
    ]
    out = train.run(compose_config("train", tmp_path / "r", [*args, "task.kd_weight=0"]))
    assert out["global_step"] == 2 and out["test/acc"] is not None
    with pytest.raises(ValueError, match="task.teacher= is required"):
        train.run(compose_config("train", tmp_path / "r2", args))


def test_greedy_start_falls_back_to_the_largest_savings_under_a_tight_budget():
    from metamorph.methods.bespoke.anneal import Choice, anneal

    # one-block replacements lose little per ms but cannot reach 4 ms; the 3-block one can
    small = [
        Choice(
            f"s{i}",
            i,
            i + 1,
            -0.5,
        )
        for i in range(3)
    ]
    big = Choice("big", 0, 3, -2.5)
    acc = {"s0": 89.0, "s1": 89.0, "s2": 89.0, "big": 80.0}
    res = anneal([*small, big], lambda s: min(acc[i] for i in s), 6.0, 4.0, acc, 90.0, steps=0)
    assert res.greedy == frozenset({"big"}) and res.best == frozenset({"big"})


def test_search_retries_lower_when_every_state_measures_over(lana_house, tmp_path, monkeypatch):
    root, tfile, _ = lana_house
    teacher_ms = fake_timer(load_model(tfile), None, None).median_ms
    calls = []

    def slow_at_first(model, profile):  # the first round's measurements read 1.6x (load)
        calls.append(1)
        m = fake_measure(model, profile)
        if len(calls) <= len(cust.LANA_TIGHTEN):
            m.latency_ms *= 1.6
        return m

    monkeypatch.setattr(cust, "measure_model", slow_at_first)
    budget = f"budget.max_latency_ms={teacher_ms * 0.8}"
    with pytest.raises(BudgetError, match="all over budget"):
        _customize(root, tmp_path / "a", budget, "bespoke.top_states=10")
    calls.clear()
    s = _customize(root, tmp_path / "b", budget, "bespoke.top_states=10", "bespoke.retries=2")
    assert s["retried"] and s["measured_latency_ms"] <= teacher_ms * 0.8 * 0.95


def test_a_dwsep_model_file_loads_in_a_process_that_never_imported_the_method(tmp_path):
    """metamorph-profile / metamorph.load rebuild a model file from its family: a LANA student's
    family must be known without importing metamorph.methods.bespoke."""
    import subprocess
    import sys

    from metamorph.io.model_file import save_model
    from metamorph.models import create_model
    from metamorph.models.dwsep import dwsep_block, dwsep_layers
    from metamorph.models.segments import set_submodule

    net = create_model("resnet20").eval()
    set_submodule(net, "layer2.1", dwsep_block(net.layer2[1]))
    assert dwsep_layers(net)
    path = save_model(net, tmp_path / "student")
    code = (
        "import sys, torch, metamorph; from metamorph.io.model_file import load_model; "
        f"m = load_model({str(path)!r}); "
        "assert 'metamorph.methods.bespoke' not in sys.modules; "
        "print(type(m.layer2[1].conv1).__name__)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "DWSepConv"
