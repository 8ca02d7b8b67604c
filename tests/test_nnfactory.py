"""NN-Factory: class-subset tasks, the modular supernet's extraction, the assembler's exact
sparsity, the two training stages through metamorph-train (unseen tasks never trained on), and
metamorph-customize (never over budget; bad task / impossible budget: clear error, nothing
written). Tiny synthetic networks and the embedded mini data; latency faked where it is timed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import QUIET, TINY_DATA, compose_config, randomize_bn

from metamorph.cli import train
from metamorph.devices import BudgetError
from metamorph.methods.nnfactory import customize as cust
from metamorph.methods.nnfactory.assembler import Assembler, hard_mask, modules_on
from metamorph.methods.nnfactory.class_tasks import (
    CIFAR10_CLASSES,
    TaskSplit,
    parse_task,
    restrict,
    task_accuracy,
)
from metamorph.methods.nnfactory.config import AssemblerConfig, SupernetConfig
from metamorph.methods.nnfactory.factory import Factory, load_factory, save_factory
from metamorph.methods.nnfactory.module import AssemblerModule, SupernetModule
from metamorph.methods.nnfactory.supernet import ModularSupernet, arch_costs, random_mask
from metamorph.models.resnet_cifar import CifarResNet, cifar_resnet_arch
from metamorph.runtime.checkpoints import checkpoint_kind, load_checkpoint
from metamorph.runtime.customizers import get_customizer, list_customizers


def tiny_supernet(groups: int = 2, shortcut: str = "A", seed: int = 0) -> ModularSupernet:
    torch.manual_seed(seed)
    net = CifarResNet(cifar_resnet_arch(depth=20, stage_widths=[4, 8, 8], shortcut=shortcut))
    return ModularSupernet(randomize_bn(net, seed).eval(), groups)


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------


def test_task_names_parse_and_bad_ones_fail_clearly():
    assert parse_task(["truck", "cat", "dog"]) == (3, 5, 9)
    assert parse_task("cat,dog") == (3, 5)
    with pytest.raises(
        ValueError, match=r"unknown class 'cta'.*did you mean 'cat'.*classes: airplane"
    ):
        parse_task(["cta", "dog"])
    with pytest.raises(ValueError, match=r"the task is empty: give 2 to 5 class names"):
        parse_task([])
    with pytest.raises(ValueError, match=r"class cat is named twice"):
        parse_task(["cat", "cat", "dog"])
    with pytest.raises(ValueError, match=r"a task has 2 to 5 classes; got 1"):
        parse_task(["cat"])
    with pytest.raises(ValueError, match=r"got 6"):
        parse_task(list(CIFAR10_CLASSES[:6]))


def test_split_holds_out_a_fifth_of_the_subsets_seeded_and_disjoint():
    a, b = TaskSplit(seed=0), TaskSplit(seed=0)
    total = sum(len(s) for s in (a.seen, a.unseen))
    assert total == 45 + 120 + 210 + 252  # subsets of 2..5 of 10 classes
    assert len(a.unseen) == round(0.2 * total)
    assert a.unseen == b.unseen and not set(a.seen) & set(a.unseen)
    assert TaskSplit(seed=1).unseen != a.unseen
    assert all(not a.is_seen(t) for t in a.unseen) and all(a.is_seen(t) for t in a.seen[:20])


def test_task_accuracy_restricts_the_logits_to_the_task():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.0], [0.0, 9.0, 1.0]])
    y = torch.tensor([2, 0, 1])
    # task (0, 2): image 0 (class 2) wins over class 0 once class 1 is dropped; image 2 is off-task
    assert torch.equal(restrict(logits, (0, 2)), logits[:, [0, 2]])
    assert task_accuracy(lambda x: x, [(logits, y)], (0, 2)) == 100.0
    assert task_accuracy(lambda x: x, [(logits, y)], (1, 2)) == 50.0


@pytest.mark.parametrize("stage", ["supernet", "assembler"])
def test_training_steps_are_conditioned_on_seen_tasks_only(stage):
    sn = tiny_supernet()
    split = TaskSplit(seed=0)
    if stage == "supernet":
        m = SupernetModule(sn, sn.net, split, SupernetConfig())
    else:
        m = AssemblerModule(sn, Assembler(10, sn.num_modules), split, AssemblerConfig())
    drawn = {m.draw(step)[0] for step in range(3000)}
    assert drawn and not drawn & set(split.unseen)
    assert m.draw(17) == m.draw(17)  # seeded by the step: a resumed run draws the same


# ----------------------------------------------------------------------------------------------
# The supernet: masks and physical extraction
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups,shortcut", [(1, "A"), (2, "A"), (4, "B")])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.6, 0.9])
def test_extracted_network_is_smaller_and_equals_the_masked_supernet(groups, shortcut, sparsity):
    sn = tiny_supernet(groups, shortcut)
    rng = np.random.default_rng(int(sparsity * 10) + groups)
    for _ in range(3):
        mask = random_mask(sn.num_modules, sparsity, rng)
        assert sum(mask) == sn.num_modules - round(sparsity * sn.num_modules)
        net = sn.extract(mask)
        assert type(net) is CifarResNet and net.arch.hidden == sn.arch_for(mask).hidden
        with torch.no_grad():
            masked = sn(X, torch.tensor(mask, dtype=torch.float32))
            torch.testing.assert_close(net(X), masked, rtol=1e-5, atol=1e-5)
            task = (1, 4, 7)
            torch.testing.assert_close(sn.extract(mask, task)(X), masked[:, list(task)])
        full = sum(p.numel() for p in sn.net.parameters())
        small = sum(p.numel() for p in net.parameters())
        assert small < full if sparsity > 0 else small == full
        skipped = sn.describe(mask)["skipped_blocks"]
        assert sum(len(s) for s in net.arch.hidden) == 9 - len(skipped)


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("bn", [True, False])
def test_analytic_costs_equal_the_counters(shortcut, bn):
    from metamorph.utils.profile import count_flops, count_params

    net = CifarResNet(cifar_resnet_arch(depth=20, stage_widths=[4, 8, 8], shortcut=shortcut, bn=bn))
    sn = ModularSupernet(net, 2)
    rng = np.random.default_rng(0)
    for s in (0.0, 0.5, 0.9):
        arch = sn.arch_for(random_mask(sn.num_modules, s, rng), (1, 2, 3))
        small = CifarResNet(arch)
        assert arch_costs(arch) == {
            "params": count_params(small),
            "flops": count_flops(small, (1, 3, 32, 32)),
        }


def test_every_module_off_still_extracts_exactly():
    sn = tiny_supernet()
    mask = tuple([0] * sn.num_modules)
    net = sn.extract(mask)
    assert net.arch.hidden == [[1], [1], [1]]  # first blocks keep their shortcut (+ a dead channel)
    with torch.no_grad():
        torch.testing.assert_close(net(X), sn(X, torch.zeros(sn.num_modules)))


def test_bad_masks_and_supernets_fail_clearly():
    sn = tiny_supernet()
    with pytest.raises(ValueError, match=r"mask has 3 entries; the supernet has 24 modules"):
        sn.check_mask([1, 0, 1])
    with pytest.raises(ValueError, match=r"mask entry 0 \(layer1\.0\.g0\) is 2"):
        sn.check_mask([2] + [1] * 23)
    with pytest.raises(ValueError, match=r"groups=5: .* in 1\.\.4"):
        ModularSupernet(sn.net, 5)


# ----------------------------------------------------------------------------------------------
# The assembler
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["topk", "gumbel"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.45, 0.9])
def test_assembler_mask_has_exactly_the_requested_sparsity_and_a_gradient(mode, sparsity):
    g = Assembler(10, 42)
    torch.nn.init.normal_(g.head.weight)
    vec = torch.zeros(10)
    vec[[3, 5, 9]] = 1
    m = g.mask(vec, sparsity, mode, noise=True, generator=torch.Generator().manual_seed(0))
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    assert int(m.sum().round()) == 42 - round(sparsity * 42) == modules_on(42, sparsity)
    (m * torch.arange(42.0)).sum().backward()
    assert g.head.weight.grad is not None and g.head.weight.grad.abs().sum() > 0


def test_masks_follow_the_task_and_bad_sparsities_fail():
    g = Assembler(10, 20)
    torch.nn.init.normal_(g.head.weight)
    a = g.mask(torch.eye(10)[0] + torch.eye(10)[1], 0.5)
    b = g.mask(torch.eye(10)[7] + torch.eye(10)[8], 0.5)
    assert not torch.equal(a, b)
    blind = Assembler(10, 20, use_task=False)
    assert torch.equal(blind(torch.eye(10)[0], 0.5), blind(torch.eye(10)[5], 0.5))
    with pytest.raises(ValueError, match=r"sparsity 0\.95 is outside \[0, 0\.9\]"):
        g.mask(torch.eye(10)[0], 0.95)
    with pytest.raises(ValueError, match="unknown mask mode 'soft'"):
        hard_mask(torch.zeros(3), 1, "soft")


# ----------------------------------------------------------------------------------------------
# Training stages through metamorph-train, then customization
# ----------------------------------------------------------------------------------------------

SHORT = [
    *TINY_DATA,
    *QUIET,
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "model.name=resnet20",
    "+model.kwargs.stage_widths=[4,8,8]",
    "task.probes=2",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny factory trained by the two tasks (3 steps each)."""
    root = tmp_path_factory.mktemp("nnf")
    s1 = train.run(
        compose_config("train", root / "s1", [*SHORT, "task=nnfactory_supernet", "task.groups=2"])
    )
    assert s1["unseen_tasks_trained"] == 0 and Path(s1["model_file"]).is_file()
    s2 = train.run(
        compose_config(
            "train",
            root / "s2",
            [*SHORT, "task=nnfactory_assembler", f"task.supernet={s1['model_file']}"],
        )
    )
    assert s2["unseen_tasks_trained"] == 0
    return root, s1, s2


def test_the_two_stages_write_a_factory_and_typed_checkpoints(trained):
    root, s1, s2 = trained
    f = load_factory(s2["factory"])
    assert f.supernet.num_modules == s1["modules"] == 24 and f.assembler.num_modules == 24
    assert f.classes == list(CIFAR10_CLASSES)
    for stage, kind in (("s1", "nnfactory_supernet"), ("s2", "nnfactory_assembler")):
        ckpt = next((root / stage / "checkpoints").glob("*.ckpt"))
        assert checkpoint_kind(ckpt) == kind
        assert isinstance(load_checkpoint(ckpt), torch.nn.Module)
    with pytest.raises(ValueError, match="not an NN-Factory supernet"):
        train.run(
            compose_config(
                "train",
                root / "bad",
                [*SHORT, "task=nnfactory_assembler", f"task.supernet={s2['factory']}"],
            )
        )


def test_factory_round_trips_through_its_files(tmp_path):
    sn = tiny_supernet()
    g = Assembler(10, sn.num_modules)
    path = save_factory(Factory(sn, g, TaskSplit(seed=3)), tmp_path / "f")
    back = load_factory(path)
    assert back.split.unseen == TaskSplit(seed=3).unseen
    m = tuple(random_mask(sn.num_modules, 0.4, np.random.default_rng(0)))
    with torch.no_grad():
        torch.testing.assert_close(back.supernet.extract(m)(X), sn.extract(m)(X))
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="is not an NN-Factory factory"):
        load_factory(tmp_path / "x.json")


class FakePredictor:
    """Latency = FLOPs / 1e6 ms (monotone in the network's size, no timing)."""

    def __init__(self, *a, **k):
        pass

    def predict(self, arch):
        return arch_costs(arch)["flops"] / 1e6


def fake_measure(factor_for):
    """``measure_model`` stand-in: predicted latency times ``factor_for(call index)``."""
    calls = []

    def measure(model, profile):
        ms = FakePredictor().predict(model.arch) * factor_for(len(calls))
        calls.append(ms)
        return SimpleNamespace(
            latency_ms=ms, memory_mb=0.1, latency=SimpleNamespace(iqr_ms=0.0), to_dict=dict
        )

    return measure, calls


def patch_measure(monkeypatch, measure) -> None:
    """The budget's end-to-end check (``Budget.measure``, fresh processes) replaced by
    ``measure(model, profile)``."""
    monkeypatch.setattr(cust.Budget, "measure", lambda self, model: measure(model, self.profile))


def _customize(trained, tmp_path, *overrides):
    _, _, s2 = trained
    cfg = compose_config(
        "customize",
        tmp_path,
        [
            *TINY_DATA,
            f"nnfactory.factory={s2['factory']}",
            f"out={tmp_path / 'out' / 'm'}",
            *overrides,
        ],
    )
    return get_customizer("nnfactory")(cfg)


def test_customizer_is_registered():
    assert "nnfactory" in list_customizers()


@pytest.mark.parametrize("task", ["[cat,dog,truck]", "[airplane,ship]"])
def test_customization_never_returns_a_model_over_budget(trained, tmp_path, monkeypatch, task):
    monkeypatch.setattr(cust, "LatencyPredictor", FakePredictor)
    # the two best-ranked candidates measure 40% slower than predicted: they must be passed over
    measure, calls = fake_measure(lambda i: 1.4 if i < 2 else 1.0)
    patch_measure(monkeypatch, measure)
    full = FakePredictor().predict(cifar_resnet_arch(depth=20, stage_widths=[4, 8, 8]))
    limit = round(0.6 * full, 4)
    s = _customize(trained, tmp_path, f"classes={task}", f"budget.max_latency_ms={limit}")
    assert s["measured_latency_ms"] <= limit and s["predicted_latency_ms"] <= limit
    assert len(calls) >= 1 and all(c > limit for c in calls[:-1])
    model = load_checkpoint(s["model_file"])
    assert model.arch.num_classes == len(task.strip("[]").split(","))
    report = json.loads(Path(s["report"]).read_text())
    assert report["options"] and all(
        o["measured_latency_ms"] is None
        or o["within_budget"] == (o["measured_latency_ms"] <= limit)
        for o in report["options"]
    )
    assert s["customize_s"] < 30
    scored = [o for o in report["options"] if o["score"] is not None and o["score"] >= 0]
    assert 1 <= len(scored) <= 6  # rank_top: only the least sparse feasible ones are ranked


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["classes=[cat,dgo]", "budget.max_flops=1e9"], r"unknown class 'dgo'.*did you mean 'dog'"),
        (["classes=[]", "budget.max_flops=1e9"], r"the task is empty"),
        (["classes=[cat,dog]", "budget.max_flops=10"], r"no assembly meets the budget .*FLOPs"),
        (["classes=[cat,dog]"], r"the budget sets no limit"),
    ],
)
def test_bad_tasks_and_impossible_budgets_fail_clearly_and_write_nothing(
    trained, tmp_path, monkeypatch, overrides, message
):
    monkeypatch.setattr(cust, "LatencyPredictor", FakePredictor)
    patch_measure(monkeypatch, fake_measure(lambda i: 1.0)[0])
    with pytest.raises(ValueError, match=message):
        _customize(trained, tmp_path, *overrides)
    assert not (tmp_path / "out").exists()


def test_customization_writes_a_checked_onnx_file_on_request(trained, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    monkeypatch.setattr(cust, "LatencyPredictor", FakePredictor)
    patch_measure(monkeypatch, fake_measure(lambda i: 1.0)[0])
    s = _customize(
        trained,
        tmp_path,
        "classes=[cat,dog,truck]",
        "budget.max_flops=1e9",
        "format=onnx",
        "onnx.exporter=legacy",
    )
    assert s["onnx_max_abs_diff"] <= 1e-4 and Path(s["onnx"]).is_file()
    model = load_checkpoint(s["model_file"])
    sess = ort.InferenceSession(s["onnx"], providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    mean = torch.tensor(model.arch.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.arch.std).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(got, model((x - mean) / std).numpy(), atol=1e-4)
    assert json.loads(Path(s["report"]).read_text())["onnx"] == s["onnx"]
    with pytest.raises(ValueError, match="format='tflite'"):
        _customize(
            trained, tmp_path / "bad", "classes=[cat,dog]", "budget.max_flops=1e9", "format=tflite"
        )
    assert not (tmp_path / "bad" / "out").exists()


def test_a_budget_every_candidate_measures_over_raises(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(cust, "LatencyPredictor", FakePredictor)
    patch_measure(monkeypatch, fake_measure(lambda i: 10.0)[0])
    with pytest.raises(BudgetError, match=r"measured end to end, all over budget"):
        _customize(trained, tmp_path, "classes=[cat,dog]", "budget.max_latency_ms=2.0")
    assert not (tmp_path / "out").exists()


def test_console_script_takes_task_and_fails_in_one_line(trained, tmp_path):
    import subprocess
    import sys

    _, _, s2 = trained
    out = tmp_path / "cli" / "m"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "metamorph.cli.customize",
            "method=nnfactory",
            f"nnfactory.factory={s2['factory']}",
            "task=[cat]",
            "budget.max_flops=1e9",
            f"out={out}",
            *TINY_DATA,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "metamorph-customize: error: a task has 2 to 5 classes; got 1 (cat)"
    )
    assert not (tmp_path / "cli").exists()


def test_supernet_stage_resumes_from_last_ckpt(tmp_path):
    args = [
        *[a for a in SHORT if "limit_train_batches" not in a and "max_epochs" not in a],
        "task=nnfactory_supernet",
        "task.groups=2",
        "trainer.max_epochs=10",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "test=false",
    ]
    first = train.run(compose_config("train", tmp_path, [*args, "trainer.max_steps=2"]))
    assert first["global_step"] == 2
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint_kind(last) == "nnfactory_supernet"
    resumed = train.run(
        compose_config("train", tmp_path, [*args, "trainer.max_steps=4", f"ckpt_path={last}"])
    )
    assert resumed["global_step"] == 4 and resumed["unseen_tasks_trained"] == 0
