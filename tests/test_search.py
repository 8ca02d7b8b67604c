"""GeneCAI-style search (metamorph.search): genotype decoding, Tucker-2 layers, masked vs physical
pruning, analytic FLOPs, the two GAs, parallel evaluation, the metamorphic space and the CLI.
Tiny models and data, one thread."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import metamorph
from metamorph import create_model
from metamorph.io.model_file import save_model
from metamorph.models import fold_batchnorm
from metamorph.search import (
    DecompositionEvaluator,
    DecompositionSpace,
    MetamorphSpace,
    PopulationEvaluator,
    PruningEvaluator,
    PruningSpace,
    SearchConfig,
    Tucker2Conv,
    channel_order,
    channel_saliency,
    decompose_conv,
    model_flops,
    non_dominated,
    prune_physical,
    rank_levels,
    save_compressed,
    scalar_score,
    search_phase,
)
from metamorph.search.evaluate import Evaluator, MetamorphEvaluator
from metamorph.search.ga import EvalStore, front_records
from metamorph.search.lowrank import lowrank_layers
from metamorph.utils.profile import count_flops

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "metamorph" / "conf"


@torch.no_grad()
def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def tiny_net(shortcut="A", seed=0, bn=True):
    torch.manual_seed(seed)
    net = create_model(
        "resnet20", stage_widths=[8, 12, 16], hidden_width=[8, 12, 16], shortcut=shortcut
    )
    net = _randomize_bn(net, seed).eval()
    return net if bn else fold_batchnorm(net)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 10, (24,), generator=g)


def random_genotypes(space, n, seed=0):
    rng = np.random.default_rng(seed)
    X = np.empty((n, space.n_var))
    for i, gene in enumerate(space.genes):
        X[:, i] = rng.uniform(
            gene.grid[0], gene.grid[-1] + (0.999 if gene.kind == "level" else 0), n
        )
    return space.repair(X)


# ----------------------------------------------------------------------------------------------
# Tucker-2 layers
# ----------------------------------------------------------------------------------------------


def test_rank_levels():
    assert rank_levels(64) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert rank_levels(16) == [2, 4, 6, 8, 10, 12, 14, 16]
    assert rank_levels(4) == [1, 2, 3, 4]  # deduplicated, at least 1
    assert rank_levels(12)[-1] == 12


def test_tucker_top_bin_is_the_original_conv_and_full_ranks_reproduce_it():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 16, 3, 2, 1, bias=True)
    x = torch.randn(3, 12, 9, 9)
    top = decompose_conv(conv, 12, 16)
    assert isinstance(top, torch.nn.Conv2d) and not isinstance(top, Tucker2Conv)
    assert torch.equal(top(x), conv(x))  # the top bin is the original conv: exact
    full = decompose_conv(conv, 12, 16, absorb_full=False)  # explicit orthogonal factors
    assert isinstance(full, Tucker2Conv) and full.first is not None and full.last is not None
    torch.testing.assert_close(full(x), conv(x), atol=1e-5, rtol=1e-5)
    conv64 = copy.deepcopy(conv).double()
    torch.testing.assert_close(
        decompose_conv(conv64, 12, 16, absorb_full=False)(x.double()),
        conv64(x.double()),
        atol=1e-10,
        rtol=0,
    )
    # one mode at full rank: its factor is absorbed into the core (exactly the same function)
    half = decompose_conv(conv, 12, 8)
    assert half.first is None and half.last is not None and half.core.weight.shape == (8, 12, 3, 3)
    explicit = decompose_conv(conv, 12, 8, absorb_full=False)
    torch.testing.assert_close(half(x), explicit(x), atol=1e-5, rtol=1e-5)
    assert half.last.bias is not None and half.core.bias is None  # the bias sits on the last conv
    # lower ranks: larger reconstruction error, with shapes as declared
    errs = []
    for r in (2, 6, 10):
        t = decompose_conv(conv, r, r)
        assert t.first.weight.shape == (r, 12, 1, 1) and t.core.weight.shape == (r, r, 3, 3)
        assert t.last.weight.shape == (16, r, 1, 1)
        errs.append((t.effective_weight() - conv.weight).norm().item())
    assert errs[0] > errs[1] > errs[2] > 0
    # HOOI sweeps never do worse than the plain HOSVD
    hooi = decompose_conv(conv, 4, 4, iters=5)
    assert (hooi.effective_weight() - conv.weight).norm() <= (
        decompose_conv(conv, 4, 4).effective_weight() - conv.weight
    ).norm() + 1e-6


def test_decomposition_decoding_is_bijective_with_declared_shapes_and_flops(data):
    x, y = data
    for shortcut in ("A", "B"):
        net = tiny_net(shortcut)
        space = DecompositionSpace(net)
        assert "conv1" not in space.layers  # the stem is excluded (exclude_stem=True)
        assert len(space.layers) == 18 and space.n_var == 36
        ev = DecompositionEvaluator(net, space, x, y, batch_size=12)
        ev.setup()
        ident = space.identity()
        assert space.flops(ident) == count_flops(net) == model_flops(net)
        assert torch.equal(ev.build(ident)(x), net(x))  # all at the top bin: the original net
        for g in random_genotypes(space, 4, seed=1 if shortcut == "A" else 2):
            assert np.array_equal(space.encode(space.decode(g)), g)
            assert space.is_valid(g)
            built = ev.build(g)
            ranks = space.decode(g)
            for name, layer in built.named_modules():
                if name in ranks:
                    r_in, r_out = ranks[name]
                    c_in, c_out = space.channels[name]
                    if (r_in, r_out) == (c_in, c_out):
                        assert type(layer) is torch.nn.Conv2d
                    else:
                        assert isinstance(layer, Tucker2Conv)
                        assert layer.ranks == (
                            r_in if r_in < c_in else None,
                            r_out if r_out < c_out else None,
                        )
            assert space.flops(g) == model_flops(built) == count_flops(built)
            torch.testing.assert_close(ev._logits_fn(g)(x), built(x))
    with pytest.raises(ValueError, match="bins"):
        space.encode({"layer2.1.conv1": (5, 12)})


# ----------------------------------------------------------------------------------------------
# Pruning
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["taylor", "grad", "l1"])
def test_masked_pruning_equals_physical_pruning(data, criterion):
    x, y = data
    for net in (tiny_net("A"), tiny_net("B", seed=1, bn=False)):
        order = channel_order(channel_saliency(net, x, y, criterion))
        assert all(sorted(o.tolist()) == list(range(len(o))) for o in order.values())
        space = PruningSpace(net, order)
        ev = PruningEvaluator(net, space, x, y, batch_size=12)
        ev.setup()
        for g in random_genotypes(space, 3, seed=3):
            assert np.array_equal(space.encode(space.decode(g)), g)
            pruned = ev.build(g)
            assert pruned.arch.hidden == space.hidden(g)
            assert space.flops(g) == model_flops(pruned) == count_flops(pruned)
            torch.testing.assert_close(ev._logits_fn(g)(x), pruned(x), atol=1e-5, rtol=1e-5)
        # the most aggressive rate keeps one channel per block
        g = space.repair(np.ones(space.n_var))
        assert all(w == 1 for s in space.hidden(g) for w in s)


def test_prune_a_decomposed_network_and_save_load(data, tmp_path):
    x, y = data
    net = tiny_net("A")
    dspace = DecompositionSpace(net)
    g = random_genotypes(dspace, 1, seed=5)[0]
    dec = DecompositionEvaluator(net, dspace, x, y).build(g)
    assert lowrank_layers(dec)
    space = PruningSpace(dec, channel_order(channel_saliency(dec, x, y, "taylor")))
    ev = PruningEvaluator(dec, space, x, y)
    ev.setup()
    gp = random_genotypes(space, 1, seed=6)[0]
    pruned = ev.build(gp)
    torch.testing.assert_close(ev._logits_fn(gp)(x), pruned(x), atol=1e-5, rtol=1e-5)
    assert space.flops(gp) == count_flops(pruned) == model_flops(pruned)
    path = save_compressed(pruned, tmp_path / "lowrank_pruned", meta={"k": 1})
    assert json.loads(path.read_text())["family"] == "cifar_resnet_lowrank"
    loaded = metamorph.load(path)
    assert lowrank_layers(loaded) == lowrank_layers(pruned)
    torch.testing.assert_close(loaded(x), pruned(x))
    # without low-rank layers the file is a plain cifar_resnet
    plain = prune_physical(net, {"layer1.0": torch.tensor([0, 2, 5])})
    assert (
        json.loads(save_compressed(plain, tmp_path / "plain").read_text())["family"]
        == "cifar_resnet"
    )


# ----------------------------------------------------------------------------------------------
# Pareto utilities, scores and the search on a synthetic problem
# ----------------------------------------------------------------------------------------------


def test_non_dominated_and_scalar_score():
    rng = np.random.default_rng(0)
    acc, flops = rng.integers(0, 20, 200).astype(float), rng.integers(0, 20, 200).astype(float)
    front = non_dominated(acc, flops)
    pts = list(zip(acc, flops))
    for i in front:
        assert not any(
            pts[j][0] >= pts[i][0] and pts[j][1] <= pts[i][1] and pts[j] != pts[i]
            for j in range(200)
        )
    for j in range(200):
        assert any(acc[i] >= acc[j] and flops[i] <= flops[j] for i in front)
    s = scalar_score([90.0, 90.0, 80.0, 95.0], [50, 25, 25, 120], 91.0, 100, 85.0)
    assert s[1] > s[0] > 0 and s[2] < s[1] and s[3] == 0.0
    assert s[0] == pytest.approx(np.exp(50.0) / 2.0)


class SyntheticEvaluator(Evaluator):
    """Accuracy = a smooth function of the pruning rates (no network run)."""

    def __init__(self, space):
        super().__init__(space, torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
        self.w = np.linspace(5.0, 40.0, space.n_var)

    def accuracy(self, g):
        return float(92.0 - np.dot(self.w, np.asarray(g) ** 2) / len(g) * 4)


def _synthetic_search(algorithm, seed):
    net = tiny_net("A")
    space = PruningSpace(net, {b: torch.arange(space_w) for b, space_w in _widths(net).items()})
    cfg = SearchConfig(algorithm=algorithm, pop_size=10, generations=5, bound_step=0.25)
    return search_phase(
        space, SyntheticEvaluator(space), cfg, acc_drop=20.0, seed=seed, log=lambda s: None
    )


def _widths(net):
    return {
        f"layer{s + 1}.{b}": w for s, st in enumerate(net.arch.hidden) for b, w in enumerate(st)
    }


@pytest.mark.parametrize("algorithm", ["nsga2", "scalar"])
def test_search_returns_a_non_dominated_front_and_is_seeded(algorithm):
    if algorithm == "nsga2":
        pytest.importorskip("pymoo")
    res = _synthetic_search(algorithm, seed=3)
    front = res.front
    assert len(front) >= 3
    assert all(r.feasible for r in front)
    for a in front:
        for b in front:
            if a is not b:
                assert not (a.acc >= b.acc and a.flops <= b.flops), "front point dominated"
    feasible = [r for r in res.store.records if r.feasible]
    for r in feasible:
        assert any(f.acc >= r.acc and f.flops <= r.flops for f in front)
    ev = res.evaluations
    assert ev["bounds"] > 0 and ev["search"] > 0 and ev["total"] == len(res.store.records)
    assert len(res.ga.trajectory) == 6  # initial population + 5 generations
    again = _synthetic_search(algorithm, seed=3)
    assert [(r.genotype, r.acc, r.flops) for r in again.front] == [
        (r.genotype, r.acc, r.flops) for r in front
    ]
    assert [r.genotype for r in again.store.records] == [r.genotype for r in res.store.records]


def test_eval_store_memoises_and_writes_csv(tmp_path):
    net = tiny_net("A")
    space = PruningSpace(net, {b: torch.arange(w) for b, w in _widths(net).items()})
    calls = []

    def fn(gs):
        calls.append(len(gs))
        return [(50.0, space.flops(g)) for g in gs]

    store = EvalStore(space, fn, threshold=40.0)
    g = space.repair(np.full(space.n_var, 0.3))
    store.evaluate(np.stack([g, g, space.identity()]), "init")
    store.evaluate(np.stack([g]), "gen1", 1)
    assert calls == [2] and len(store.records) == 2 and store.requests == 4
    store.write_csv(tmp_path / "ev.csv", base_flops=space.flops(space.identity()))
    rows = list(csv.DictReader(open(tmp_path / "ev.csv")))
    assert json.loads(rows[0]["genotype"]) == pytest.approx(list(g))
    assert json.loads(rows[0]["decoded"])["hidden"] == space.hidden(g)
    assert front_records(store.records)[0].flops == min(r.flops for r in store.records)


@pytest.mark.slow
def test_parallel_population_evaluation_matches_sequential(data):
    x, y = data
    net = tiny_net("A")
    space = DecompositionSpace(net)
    ev = DecompositionEvaluator(net, space, x, y)
    G = random_genotypes(space, 6, seed=7)
    seq = PopulationEvaluator(ev, n_jobs=1)(G)
    with PopulationEvaluator(ev, n_jobs=2) as pe:
        par = pe(G)
        assert pe(G[:2]) == par[:2]  # workers reuse their cached evaluator
    assert par == seq


# ----------------------------------------------------------------------------------------------
# Metamorphic genotype through a tiny metamorphic checkpoint
# ----------------------------------------------------------------------------------------------

TINY = [
    "data=cifar10_mini",
    "data.train_subset=32",
    "data.val_size=20",
    "data.test_subset=20",
    "data.batch_size=16",
    "data.eval_batch_size=20",
]


def _compose(name, root, out, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            name, overrides=[f"paths.root_dir={root}", f"paths.output_dir={out}", *overrides]
        )


@pytest.fixture(scope="module")
def mm_ckpt(tmp_path_factory):
    from metamorph.cli.train import run

    d = tmp_path_factory.mktemp("search_mm")
    torch.manual_seed(0)
    save_model(
        create_model("resnet20", stage_widths=[8, 8, 16], hidden_width=[8, 8, 16]), d / "base"
    )
    cfg = _compose(
        "train",
        d,
        d / "mm",
        [
            "task=metamorph",
            f"task.base={d / 'base.json'}",
            "task.prepare.permute=false",
            "task.scope.blocks=[layer3.0,layer3.1,layer3.2]",
            "task.scope.depth_choices=[2,3]",
            "task.sweep.gammas=[0.0]",
            "trainer=cpu",
            "trainer.max_steps=1",
            "trainer.max_epochs=1",
            "+trainer.limit_val_batches=0",
            "+trainer.enable_progress_bar=false",
            "~callbacks.progress_bar",
            "~callbacks.lr_monitor",
            "logger=none",
            "test=false",
            "hypernet=small",
            "hypernet.hidden=8",
            "hypernet.layers=1",
            "hypernet.freqs=2",
            *TINY,
        ],
    )
    summary = run(cfg)
    return Path(summary["checkpoint"])


def test_metamorph_genotype_decodes_through_the_checkpoint(mm_ckpt, data):
    from metamorph.tasks.metamorph_train import load_metamorph_checkpoint

    x, y = data
    module = load_metamorph_checkpoint(mm_ckpt)
    net = module.net
    space = MetamorphSpace(net)
    assert [g.name for g in space.genes] == [
        "layer3.0",
        "layer3.1",
        "layer3.2",
        "stage1:depth",
        "stage2:depth",
        "stage3:depth",
    ]
    ident = space.identity()
    assert space.decode(ident) == net.full_shape
    ev = MetamorphEvaluator(space, x, y, batch_size=12, ckpt=mm_ckpt, module=module)
    shapes = set()
    for g in random_genotypes(space, 12, seed=4):
        hidden = space.decode(g)
        net.check_shape(hidden)  # accepted by the metamorphic network
        assert np.array_equal(space.encode(hidden), g)
        assert all(8 <= w <= 16 for w in hidden[2])  # trained range [0.5, 1.0] x 16
        assert all(len(s) in (2, 3) for s in hidden)
        built = ev.build(g)
        assert built.arch.hidden == hidden
        assert space.flops(g) == count_flops(built)
        torch.testing.assert_close(ev._logits_fn(g)(x), built(x), atol=1e-5, rtol=1e-5)
        shapes.add(json.dumps(hidden))
    assert len(shapes) > 3
    # width genes of dropped blocks are canonical (repair), so decoding stays bijective
    g = ident.copy()
    g[space.depth_gene[2]] = 0  # stage 3 keeps 2 blocks
    g[space.width_gene["layer3.2"]] = space.genes[space.width_gene["layer3.2"]].grid[-1]
    r = space.repair(g)
    assert r[space.width_gene["layer3.2"]] == 0.0 and space.decode(r)[2] == [16, 16]
    # evaluation in a fresh process reloads the checkpoint (the module is not pickled)
    state = ev.__getstate__()
    assert state["module"] is None and state["ckpt"] == str(mm_ckpt)


# ----------------------------------------------------------------------------------------------
# The CLI (in-process, tiny)
# ----------------------------------------------------------------------------------------------

SEARCH_TINY = [
    *TINY,
    "search.search_images=20",
    "search.pop_size=4",
    "search.generations=1",
    "search.bound_step=0.5",
    "search.finetune.max_steps=1",
    "search.finetune.batch_size=16",
    "search.final.points=2",
    "search.eval_batch_size=20",
]


def test_cli_genecai_pipeline(tmp_path, monkeypatch):
    from metamorph.cli.search import run

    monkeypatch.setenv("METAMORPH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    save_model(tiny_net("A"), tmp_path / "base")
    out = tmp_path / "run"
    cfg = _compose(
        "search",
        tmp_path,
        out,
        [f"base={tmp_path / 'base.json'}", "search.algorithm=scalar", *SEARCH_TINY],
    )
    lines: list[str] = []
    s = run(cfg, log=lines.append)
    assert [p["phase"] for p in s["phases"]] == ["decompose", "prune"]
    assert s["carried"][0]["phase"] == "decompose"
    assert 1 <= len(s["front"]) <= 2 and len(s["baseline"]) == len(s["front"])
    for f in s["front"]:
        m = metamorph.load(f["model_file"])
        assert count_flops(m) == f["flops"] < s["base"]["flops"]
    for b, f in zip(s["baseline"], s["front"]):
        assert b["flops"] <= f["flops"] or not b["target_reached"]
    for k in ("evaluations_decompose", "evaluations_prune", "front", "baseline", "plot"):
        assert Path(s["files"][k]).exists()
    assert Path(s["files"]["plot"]).stat().st_size > 5000
    rows = list(csv.DictReader(open(s["files"]["evaluations_decompose"])))
    assert len(rows) == s["phases"][0]["evaluations"]["total"]
    assert {r["stage"] for r in rows} >= {"base", "bounds"}
    assert "test %" in lines[-1] and "front_0" in lines[-1] and "baseline_0" in lines[-1]
    json.dumps(s)


def test_cli_metamorph_pipeline(mm_ckpt, tmp_path, monkeypatch):
    pytest.importorskip("pymoo")
    from metamorph.cli.search import run

    monkeypatch.setenv("METAMORPH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    cfg = _compose(
        "search",
        tmp_path,
        out,
        ["search=metamorph", f"ckpt={mm_ckpt}", "search.final.finetune=false", *SEARCH_TINY],
    )
    s = run(cfg, log=lambda _: None)
    assert s["method"] == "metamorph" and s["algorithm"] == "nsga2"
    assert [p["phase"] for p in s["phases"]] == ["metamorph"]
    for f in s["front"]:
        m = metamorph.load(f["model_file"])
        assert count_flops(m) == f["flops"]
        assert f["search_acc"] == pytest.approx(f["search_acc_ft"])  # not fine-tuned
    # the built-in baseline is the checkpoint's own uniform-ratio shape at matching FLOPs
    from metamorph.export.sample import materialize
    from metamorph.tasks.metamorph_train import load_metamorph_checkpoint

    module = load_metamorph_checkpoint(mm_ckpt)
    assert len(s["baseline"]) == len(s["front"])
    for b, f in zip(s["baseline"], s["front"]):
        assert b["kind"] == "uniform_gamma" and (
            b["flops"] <= f["flops"] or not b["target_reached"]
        )
        m = metamorph.load(b["model_file"])
        hidden = module.net.shape_for_gamma(b["rate"])
        assert m.arch.hidden == hidden and count_flops(m) == b["flops"]
        ref = materialize(module, hidden, k=1)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref(x))


def test_cli_config_errors(tmp_path):
    from metamorph.cli.search import run

    cfg = _compose("search", tmp_path, tmp_path / "o", ["base=/nonexistent.json"])
    with pytest.raises(FileNotFoundError):
        run(cfg)
    save_model(tiny_net("A"), tmp_path / "base")
    for bad, match in [
        ("search.search_split=test", "never"),
        ("+search.pop_sise=3", "pop_sise"),
        ("search.algorithm=random", "algorithm"),
        ("search.phases=[prune,decompose]", "phases"),
        ("search.baseline.kind=uniform_gamma", "method=metamorph"),
    ]:
        cfg = _compose("search", tmp_path, tmp_path / "o", [f"base={tmp_path / 'base.json'}", bad])
        with pytest.raises(ValueError, match=match):
            run(cfg)
    cfg = _compose("search", tmp_path, tmp_path / "o", ["search=metamorph"])
    with pytest.raises(ValueError, match="ckpt"):
        run(cfg)
    if not torch.cuda.is_available():
        cfg = _compose(
            "search", tmp_path, tmp_path / "o", [f"base={tmp_path / 'base.json'}", "device=cuda"]
        )
        with pytest.raises(ValueError, match="device=cpu"):
            run(cfg)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_evaluators_on_cuda_match_cpu_and_leave_the_base_on_cpu(data):
    x, y = data
    net = tiny_net("A")
    dspace = DecompositionSpace(net, 4, True)
    order = channel_order(channel_saliency(net, x, y, "l1"))
    pspace = PruningSpace(net, order)
    for space, make in [
        (dspace, lambda: DecompositionEvaluator(net, dspace, x, y, 12)),
        (pspace, lambda: PruningEvaluator(net, pspace, x, y, 12)),
    ]:
        cpu_ev, gpu_ev = make(), make().to("cuda")
        for g in random_genotypes(space, 3, seed=5):
            assert gpu_ev.accuracy(g) == pytest.approx(cpu_ev.accuracy(g), abs=100 / len(y) + 1e-9)
            built = gpu_ev.build(g)
            assert all(p.device.type == "cpu" for p in built.parameters())
        assert all(p.device.type == "cpu" for p in gpu_ev.model.parameters())


@needs_cuda
def test_cli_genecai_pipeline_on_cuda(tmp_path, monkeypatch):
    from metamorph.cli.search import run

    monkeypatch.setenv("METAMORPH_CACHE", str(tmp_path / "cache"))
    save_model(tiny_net("A"), tmp_path / "base")
    cfg = _compose(
        "search",
        tmp_path,
        tmp_path / "run",
        [f"base={tmp_path / 'base.json'}", "search.algorithm=scalar", "device=cuda", *SEARCH_TINY],
    )
    s = run(cfg, log=lambda _: None)
    assert s["device"].startswith("cuda")
    for f in s["front"]:
        assert count_flops(metamorph.load(f["model_file"])) == f["flops"]


@pytest.mark.slow
def test_console_script_prints_json_summary_last(tmp_path):
    pytest.importorskip("pymoo")
    import os
    import shutil
    import subprocess
    import sys

    torch.manual_seed(0)
    save_model(tiny_net("A"), tmp_path / "base")
    exe = shutil.which("metamorph-search")
    cmd = [exe] if exe else [sys.executable, "-m", "metamorph.cli.search"]
    env = dict(os.environ, OMP_NUM_THREADS="1", METAMORPH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        cmd
        + [
            f"base={tmp_path / 'base.json'}",
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
            "search.n_jobs=2",
            "search.phases=[prune]",
            *SEARCH_TINY,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["phases"][0]["phase"] == "prune" and summary["front"]
    assert Path(summary["files"]["plot"]).exists()


def test_experiment_configs_compose(tmp_path):
    from metamorph.config.schema import typed

    for exp, method in [
        ("genecai/paper/resnet56_cifar10", "genecai"),
        ("genecai/recipe/metamorph_resnet20_cifar10", "metamorph"),
    ]:
        for algo in ("nsga2", "scalar"):
            cfg = _compose(
                "search",
                tmp_path,
                tmp_path / "o",
                [f"search_experiment={exp}", f"search.algorithm={algo}"],
            )
            s = typed(SearchConfig, cfg.search, "search")
            assert s.method == method and s.algorithm == algo and s.search_split == "val"
            assert cfg.data.name == "cifar10" and cfg.name.endswith(algo)
            assert (cfg.base if method == "genecai" else cfg.ckpt) is not None


@pytest.mark.parametrize("criterion", ["taylor", "l1"])
def test_a_dead_channel_is_pruned_first(data, criterion):
    x, y = data
    net = tiny_net("A", bn=False)
    with torch.no_grad():
        net.layer2[1].conv1.weight[5].zero_()
        net.layer2[1].conv1.bias[5] = -1.0  # never active after the ReLU
    sal = channel_saliency(net, x, y, criterion)
    assert sal["layer2.1"][5] == sal["layer2.1"].min()
    if criterion == "taylor":
        assert sal["layer2.1"][5] == 0.0
    assert channel_order(sal)["layer2.1"][0] == 5


def test_baselines_script_matches_the_pipeline_baseline(data, tmp_path, monkeypatch):
    """scripts/genecai_baselines.py rebuilds the pipeline's uniform-L1 baseline for a saved front
    model: at most the front's FLOPs, the same pruning rate, written as a loadable model."""
    import importlib.util

    from metamorph.search.pipeline import search_set, uniform_l1_baseline

    monkeypatch.setenv("METAMORPH_CACHE", str(tmp_path / "cache"))
    base = tiny_net("A")
    save_model(base, tmp_path / "base")
    space = PruningSpace(base, channel_order(channel_saliency(base, *data, "l1")))
    front = prune_physical(base, space.keep(space.repair(np.full(space.n_var, 0.5))))
    save_compressed(front, tmp_path / "front_0")
    spec = importlib.util.spec_from_file_location(
        "genecai_baselines",
        Path(__file__).resolve().parents[1] / "scripts" / "genecai_baselines.py",
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gb"
    s = mod.main(
        [
            "--front", str(tmp_path / "front_0.json"), "--device", "cpu", "--threads", "1",
            "--out", str(out), "--",
            f"base={tmp_path / 'base.json'}", f"paths.root_dir={tmp_path}", *SEARCH_TINY,
        ]
    )  # fmt: skip
    row = s["baselines"][0]
    assert row["flops"] <= row["front_flops"] == model_flops(front)
    assert row["finetune_steps"] == 1 and 0 <= row["test_acc"] <= 100
    m = metamorph.load(out / "models" / "baseline_0.json")
    assert count_flops(m) == row["flops"]
    # the same rate as the pipeline's own baseline construction on the same search set
    from metamorph.runtime.data import build_datamodule

    cfg = _compose(
        "search", tmp_path, tmp_path / "o", [f"base={tmp_path / 'base.json'}", *SEARCH_TINY]
    )
    dm = build_datamodule(cfg.data, mean=base.arch.mean, std=base.arch.std, seed=0)
    dm.setup("fit")
    xs, ys = search_set(dm, "val", 20, 0)
    _, rate, _ = uniform_l1_baseline(base, row["front_flops"], "l1", xs, ys)
    assert rate == pytest.approx(row["rate"])
