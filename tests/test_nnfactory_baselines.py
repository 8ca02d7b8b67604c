"""NN-Factory's baselines (random / task-agnostic masks, the pruned and task-fine-tuned full
network), BN recalibration per assembly, the per-task test evaluation and the ONNX output of a
customization. Tiny synthetic networks, the embedded mini data; latency faked where it is timed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_DATA, compose_config, randomize_bn
from omegaconf import OmegaConf

from metamorph.devices import Budget, BudgetError
from metamorph.export.outputs import write_customized
from metamorph.methods.nnfactory import baselines as bl
from metamorph.methods.nnfactory.assembler import Assembler, modules_on
from metamorph.methods.nnfactory.class_tasks import TaskSplit, restrict, task_accuracy
from metamorph.methods.nnfactory.customize import customize, recalibrate
from metamorph.methods.nnfactory.evaluation import TestSplit, summarize
from metamorph.methods.nnfactory.factory import Factory
from metamorph.methods.nnfactory.supernet import ModularSupernet, arch_costs, random_mask
from metamorph.models.resnet_cifar import CifarResNet, cifar_resnet_arch


def tiny_net(seed: int = 0) -> CifarResNet:
    torch.manual_seed(seed)
    net = CifarResNet(cifar_resnet_arch(depth=20, stage_widths=[4, 8, 8]))
    return randomize_bn(net, seed).eval()


def tiny_factory(seed: int = 0) -> Factory:
    sn = ModularSupernet(tiny_net(seed), 2)
    g = Assembler(10, sn.num_modules)
    torch.nn.init.normal_(g.head.weight, generator=torch.Generator().manual_seed(seed))
    return Factory(sn, g, TaskSplit()).eval()


class FakePredictor:
    """Latency = FLOPs / 1e6 ms."""

    def predict(self, arch):
        return arch_costs(arch)["flops"] / 1e6


def fake_measure(factor: float = 1.0):
    def measure(model):
        ms = FakePredictor().predict(model.arch) * factor
        return SimpleNamespace(latency_ms=ms, memory_mb=0.1, latency=SimpleNamespace(iqr_ms=0.0))

    return measure


G = torch.Generator().manual_seed(5)
PX = torch.randn(60, 3, 32, 32, generator=G)
PY = torch.randint(0, 10, (60,), generator=G)
FULL = FakePredictor().predict(cifar_resnet_arch(depth=20, stage_widths=[4, 8, 8]))
GRID = [0.0, 0.2, 0.4, 0.6, 0.8]


def _budget(frac: float) -> Budget:
    return Budget(max_latency_ms=round(frac * FULL, 4), device="cpu1_b1")


def test_random_candidates_have_the_sparsity_and_are_seeded():
    a = bl.random_candidates(30, [0.2, 0.5], per_sparsity=3, seed=1)
    assert [sum(c.mask) for c in a] == [modules_on(30, c.sparsity) for c in a]
    assert len({c.mask for c in a}) == len(a) == 6
    assert [c.mask for c in a] == [c.mask for c in bl.random_candidates(30, [0.2, 0.5], 3, 1)]
    assert [c.mask for c in a] != [c.mask for c in bl.random_candidates(30, [0.2, 0.5], 3, 2)]


def test_task_agnostic_masks_ignore_the_task_and_restore_g():
    f = tiny_factory()
    a = bl.agnostic_candidates(f, GRID, 2)
    with bl.task_input_off(f):
        b = bl.agnostic_candidates(f, GRID, 2)
    assert [c.mask for c in a] == [c.mask for c in b] and a[0].source == "agnostic"
    assert f.assembler.use_task  # restored
    # G itself does depend on the task (so the ablation removes something)
    v1, v2 = torch.zeros(10), torch.zeros(10)
    v1[[0, 1]], v2[[7, 8]] = 1, 1
    assert not torch.equal(f.assembler.mask(v1, 0.4), f.assembler.mask(v2, 0.4))


def test_random_and_agnostic_baselines_go_through_the_same_search_within_budget():
    f = tiny_factory()
    task = (3, 5, 9)
    budget = _budget(0.6)
    for cands in (bl.random_candidates(f.supernet.num_modules, GRID, 3), None):
        res = customize(
            f,
            task,
            budget,
            (PX, PY),
            GRID,
            2,
            0,
            4,
            predictor=FakePredictor(),
            measure=fake_measure(),
            candidates=cands,
        )
        assert res.option.measured.latency_ms <= budget.max_latency_ms
        assert res.model.arch.num_classes == 3
    every = bl.all_classes(f)
    res = customize(
        f,
        every,
        budget,
        (PX, PY),
        GRID,
        1,
        0,
        4,
        predictor=FakePredictor(),
        measure=fake_measure(),
        candidates=bl.agnostic_candidates(f, GRID, 2),
    )
    assert res.model.arch.num_classes == 10 and res.chosen.source.startswith("agnostic")


def test_restricted_classifier_gives_the_restricted_logits():
    net = tiny_net()
    task = (1, 4, 8)
    small = bl.restrict_classifier(net, task)
    assert small.arch.num_classes == 3 and net.arch.num_classes == 10
    with torch.no_grad():
        torch.testing.assert_close(small(PX[:8]), restrict(net(PX[:8]), task))


def test_pruned_full_network_is_the_widest_within_budget_and_never_over():
    net = tiny_net()
    budget = _budget(0.5)
    pruned, option, secs = bl.prune_to_budget(
        net,
        budget,
        gammas=[0.0, 0.25, 0.5, 0.75],
        predictor=FakePredictor(),
        measure=fake_measure(),
    )
    assert (
        option.item[0] == 0.75
        or FakePredictor().predict(
            CifarResNet(
                bl.hidden_arch(net.arch, bl.shape_for_gamma(net.arch, "all", option.item[0] - 0.25))
            ).arch
        )
        > budget.max_latency_ms
    )
    assert option.measured.latency_ms <= budget.max_latency_ms
    assert pruned.arch.hidden != net.arch.hidden and secs >= 0
    # the first shape that fits measures over budget: the next (narrower) one is returned
    _, slower, _ = bl.prune_to_budget(
        net,
        budget,
        gammas=[0.0, 0.25, 0.5, 0.75],
        predictor=FakePredictor(),
        measure=lambda m: fake_measure(1.3 if sum(map(sum, m.arch.hidden)) > 60 else 1.0)(m),
    )
    assert slower.measured.latency_ms <= budget.max_latency_ms
    with pytest.raises(BudgetError, match="no pruned network meets the budget"):
        bl.prune_to_budget(
            net, _budget(0.01), gammas=[0.0, 0.5], predictor=FakePredictor(), measure=fake_measure()
        )


@pytest.fixture(scope="module")
def mini_dm(tmp_path_factory):
    from metamorph.runtime.data import build_datamodule

    cfg = compose_config("customize", tmp_path_factory.mktemp("dm"), [*TINY_DATA])
    dm = build_datamodule(cfg.data, seed=0)
    dm.setup("fit")
    return dm


def test_task_finetune_cuts_the_classifier_and_trains(mini_dm):
    net = tiny_net()
    task = (3, 5)
    tuned, rep = bl.task_finetune(net, mini_dm, task, steps=3, batch_size=8)
    assert tuned.arch.num_classes == 2 and rep["steps"] == 3 and rep["loss"] is not None
    assert not torch.equal(tuned.layer1[0].conv1.weight, net.layer1[0].conv1.weight)
    assert net.arch.num_classes == 10  # the input network is untouched
    with pytest.raises(ValueError, match="steps=-1"):
        bl.task_finetune(net, mini_dm, task, steps=-1)


def test_bn_recalibration_replaces_the_shared_statistics():
    f = tiny_factory()
    mask = random_mask(f.supernet.num_modules, 0.4, np.random.default_rng(0))
    task = (0, 2)
    plain = f.supernet.extract(mask, task)
    imgs = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    cal = recalibrate(f.supernet.extract(mask, task), imgs)
    assert not cal.training
    bn = cal.bn1
    with torch.no_grad():
        stem = cal.conv1(imgs)
    torch.testing.assert_close(bn.running_mean, stem.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain.bn1.running_mean, bn.running_mean)
    assert recalibrate(plain, None) is plain  # off: untouched
    # through the customization: the returned model carries the recalibrated statistics
    budget = _budget(0.7)
    kw = dict(predictor=FakePredictor(), measure=fake_measure())
    a = customize(f, task, budget, (PX, PY), GRID, 1, 0, 2, **kw)
    b = customize(f, task, budget, (PX, PY), GRID, 1, 0, 2, bn_images=imgs, **kw)
    if a.chosen.mask == b.chosen.mask:
        assert not torch.allclose(a.model.bn1.running_mean, b.model.bn1.running_mean)
    ref = recalibrate(f.supernet.extract(b.chosen.mask, task), imgs)
    with torch.no_grad():
        torch.testing.assert_close(b.model(PX[:4]), ref(PX[:4]))


def test_per_task_scores_from_one_pass_equal_the_cut_classifier():
    net = tiny_net()
    test = TestSplit(PX, PY, batch_size=16)
    tasks = [(0, 1), (2, 5, 7), (1, 3, 4, 6, 9)]
    one = test.per_task(test.all_logits(net), tasks)
    for t in tasks:
        acc, n = test.task_accuracy(bl.restrict_classifier(net, t), t)
        assert one[t] == (acc, n) and n == int(torch.isin(PY, torch.tensor(t)).sum())
        assert acc == task_accuracy(net, [(PX, PY)], t)


def test_summary_counts_violations_and_the_seen_unseen_gap():
    rows = [
        {
            "method": "m",
            "budget_frac": 0.5,
            "budget_ms": 2.0,
            "seen": True,
            "acc": 90.0,
            "measured_ms": 1.9,
            "violation": False,
            "wall_s": 1.0,
        },
        {
            "method": "m",
            "budget_frac": 0.5,
            "budget_ms": 2.0,
            "seen": False,
            "acc": 86.0,
            "measured_ms": 2.1,
            "violation": True,
            "wall_s": 3.0,
        },
        {
            "method": "m",
            "budget_frac": 0.5,
            "budget_ms": 2.0,
            "seen": False,
            "acc": None,
            "violation": False,
        },
    ]
    (s,) = summarize(rows)
    assert (s["seen_acc"], s["unseen_acc"], s["gap"]) == (90.0, 86.0, 4.0)
    assert (s["violations"], s["no_fit"], s["wall_s"], s["tasks"]) == (1, 1, 2.0, 3)


def test_onnx_output_matches_the_model_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model = bl.restrict_classifier(tiny_net(), (3, 5, 9))
    cfg = OmegaConf.create(
        {"format": "onnx", "export": {"normalize_in_graph": True}, "onnx": {"exporter": "legacy"}}
    )
    out = tmp_path / "o" / "m"
    files = write_customized(
        model, out, {"classes": ["cat", "dog", "truck"]}, {"a": 1}, cfg, ["cat", "dog", "truck"]
    )
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "m.customize.json",
        "m.json",
        "m.onnx",
        "m.safetensors",
    ]
    sess = ort.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # [0, 1] pixels
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    from metamorph.data.transforms import normalize

    with torch.no_grad():
        ref = model(normalize(x, model.arch.mean, model.arch.std))
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
    from metamorph.export.formats import read_onnx_input_spec

    assert read_onnx_input_spec(files["onnx"])["class_names"] == ["cat", "dog", "truck"]
    assert json.loads((tmp_path / "o" / "m.customize.json").read_text())["onnx"] == files["onnx"]


def test_a_failed_onnx_check_writes_nothing(tmp_path):
    pytest.importorskip("onnxruntime")
    model = bl.restrict_classifier(tiny_net(), (3, 5))
    cfg = OmegaConf.create({"format": "onnx", "onnx": {"exporter": "legacy", "atol": -1.0}})
    with pytest.raises(ValueError, match="differ from PyTorch's"):
        write_customized(model, tmp_path / "o" / "m", {}, {}, cfg, ["cat", "dog"])
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="format='tflite': choose one of safetensors, onnx"):
        write_customized(
            model, tmp_path / "o" / "m", {}, {}, OmegaConf.create({"format": "tflite"})
        )
    assert not (tmp_path / "o").exists()


def test_when_every_ranked_assembly_measures_over_the_next_largest_is_tried():
    f = tiny_factory()
    task = (3, 5, 9)
    budget = _budget(0.6)
    calls = []

    def measure(model):  # the two ranked ones measure far over their prediction
        calls.append(FakePredictor().predict(model.arch))
        return fake_measure(100.0 if len(calls) <= 2 else 1.0)(model)

    res = customize(
        f, task, budget, (PX, PY), GRID, 2, 0, 2, predictor=FakePredictor(), measure=measure
    )
    feasible = [
        o
        for o in res.options
        if o.predicted_ms is not None and o.predicted_ms <= budget.accepted_latency_ms
    ]
    unranked = sorted(
        (o.predicted_ms for o in feasible if o.item[0].proxy_acc is None), reverse=True
    )
    assert len(calls) >= 3 and res.chosen.proxy_acc is None
    assert res.option.predicted_ms == unranked[0]  # the largest unranked, not the smallest
