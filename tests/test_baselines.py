"""The NeuMeta baselines: pruning without fine-tuning (Torch-Pruning and a manual L1 reference),
the individually fine-tuned networks, the universally slimmable network and the Table 2 script.
Tiny networks, tiny embedded data, one thread."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DATA, compose_config, randomize_bn

import metamorph
from metamorph.baselines.pruning import (
    CRITERIA,
    CachedEval,
    changed_blocks,
    forward_to,
    prune_l1_manual,
    prune_to_gamma,
    prune_to_shape,
    pruning_curve,
    read_curve_csv,
    shape_for_gamma,
    write_curve_csv,
)
from metamorph.baselines.slimmable import (
    SandwichSampler,
    SlimmableConfig,
    SlimmableResNet,
    sort_hidden_channels,
)
from metamorph.cli.train import run
from metamorph.config.schema import OptimConfig, SchedulerConfig
from metamorph.io.model_file import save_model
from metamorph.models import CifarResNet, cifar_resnet_arch

pytest.importorskip("torch_pruning")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# 2 blocks per stage, stage widths 4/8/12: blocks layer1.0 ... layer3.1 (the last one plays layer3.2).
LAST = "layer3.1"
TINY_RUN = [
    *TINY_DATA,
    "callbacks=none",
    "logger=none",
    "+trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
]
TINY_MODEL = ["+model.kwargs.stage_widths=[4,8,12]", "+model.kwargs.blocks_per_stage=2"]


def tiny_net(seed: int = 0, bn: bool = True) -> CifarResNet:
    torch.manual_seed(seed)
    net = CifarResNet(cifar_resnet_arch(depth=14, stage_widths=(4, 8, 12)))
    randomize_bn(net, seed)
    if not bn:
        metamorph.models.fold_batchnorm(net.eval())
    return net.eval()


def images(n: int = 8, seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def calib_batches(n_batches: int = 2, bs: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [images(bs, seed=100 + i) for i in range(n_batches)]


def assert_only_hidden_changed(orig: CifarResNet, pruned: CifarResNet, kept: dict) -> None:
    """Every tensor equals the original, except the hidden dims of the pruned blocks, which are
    the original's kept channels."""
    o, p = orig.state_dict(), pruned.state_dict()
    assert list(o) == list(p)
    for k, v in p.items():
        block = ".".join(k.split(".")[:2])
        idx = torch.tensor(kept[block]) if block in kept else None
        part = k.split(".")[2] if k.startswith("layer") else ""
        if idx is not None and part in ("conv1", "bn1") and v.dim() > 0:
            assert torch.equal(v, o[k][idx]), k
        elif idx is not None and k.endswith("conv2.weight"):
            assert torch.equal(v, o[k][:, idx]), k
        else:
            assert torch.equal(v, o[k]), k


# ----------------------------------------------------------------------------------------------
# Pruning
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("blocks", [[LAST], "all"])
def test_pruned_networks_have_the_declared_shapes(criterion, blocks):
    net = tiny_net()
    x, _ = images(4)
    calib = calib_batches()
    for gamma in (0.25, 0.5, 0.75, 0.9):
        target = shape_for_gamma(net.arch, blocks, gamma)
        pruned, kept = prune_to_gamma(net, blocks, gamma, criterion, calib, return_kept=True)
        assert isinstance(pruned, CifarResNet)
        assert pruned.arch.hidden == target
        for name, w in changed_blocks(net.arch, target).items():
            blk = pruned.get_submodule(name)
            assert blk.conv1.out_channels == blk.bn1.num_features == blk.conv2.in_channels == w
            assert len(kept[name]) == w and kept[name] == sorted(set(kept[name]))
        assert pruned(x).shape == (4, 10) and torch.isfinite(pruned(x)).all()
        assert_only_hidden_changed(
            net, pruned, {n: kept[n] for n in changed_blocks(net.arch, target)}
        )


@pytest.mark.parametrize("blocks", [[LAST], "all", ["layer1.0", "layer2.1"]])
def test_torch_pruning_l1_keeps_the_same_channels_as_manual_l1(blocks):
    net = tiny_net(seed=1)
    for gamma in (0.25, 0.5, 0.75):
        target = shape_for_gamma(net.arch, blocks, gamma)
        tp_net, tp_kept = prune_to_shape(net, target, "l1", return_kept=True)
        man_net, man_kept = prune_l1_manual(net, target, return_kept=True)
        assert tp_kept == man_kept
        for (k, a), b in zip(tp_net.state_dict().items(), man_net.state_dict().values()):
            assert torch.equal(a, b), k


def test_l1_works_on_folded_networks():
    net = tiny_net(bn=False)
    target = shape_for_gamma(net.arch, "all", 0.5)
    a, ka = prune_to_shape(net, target, "l1", return_kept=True)
    b, kb = prune_l1_manual(net, target, return_kept=True)
    x, _ = images(2)
    assert ka == kb and a.arch.hidden == target and not a.arch.bn
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("criterion", CRITERIA)
def test_gamma_zero_leaves_logits_unchanged(criterion):
    net = tiny_net()
    x, _ = images(4)
    pruned = prune_to_gamma(net, "all", 0.0, criterion, calib_batches())
    assert pruned is not net and pruned.arch.hidden == net.arch.hidden
    assert torch.equal(pruned(x), net(x))


def test_pruning_does_not_modify_the_input_network():
    net = tiny_net()
    before = copy.deepcopy(net.state_dict())
    prune_to_gamma(net, "all", 0.5, "taylor", calib_batches())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_pruned_network_saves_and_loads(tmp_path):
    net = tiny_net()
    pruned = prune_to_gamma(net, [LAST], 0.75, "hessian", calib_batches())
    path = save_model(pruned, tmp_path / "pruned", meta={"gamma": 0.75})
    loaded = metamorph.load(path)
    x, _ = images(3)
    assert loaded.arch.hidden == pruned.arch.hidden == shape_for_gamma(net.arch, [LAST], 0.75)
    assert torch.equal(loaded(x), pruned(x))


def test_taylor_and_hessian_scores_match_their_definitions():
    """One step: Taylor keeps the top |w * sum_b dL_b/dw| channels, Hessian the top
    w^2 * mean_i (dl_i/dw)^2 (per-sample squared gradients)."""
    net = tiny_net(seed=2)
    calib = calib_batches(2, 5)
    target = shape_for_gamma(net.arch, [LAST], 0.5)
    width = target[2][1]
    ref = copy.deepcopy(net)
    w = ref.get_submodule(f"{LAST}.conv1").weight
    for x, y in calib:
        F.cross_entropy(ref(x), y).backward()
    taylor = (w * w.grad).abs().flatten(1).sum(1)
    sq = torch.zeros_like(w)
    for x, y in calib:
        for i in range(len(y)):
            ref.zero_grad()
            F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
            sq += w.grad**2
    hessian = (w.detach() ** 2 * sq / 10).flatten(1).sum(1)
    for crit, score in (("taylor", taylor), ("hessian", hessian)):
        _, kept = prune_to_shape(net, target, crit, calib, steps=1, return_kept=True)
        assert kept[LAST] == sorted(torch.topk(score, width).indices.tolist()), crit
        # the calibration may start at the first pruned block (cached prefix): same channels
        feats = [(forward_to(net, LAST, x), y) for x, y in calib]
        _, kept2 = prune_to_shape(net, target, crit, feats, calib_from=LAST, return_kept=True)
        _, kept3 = prune_to_shape(net, target, crit, calib, return_kept=True)
        assert kept2 == kept3


def test_random_criterion_is_seeded():
    net = tiny_net()
    target = shape_for_gamma(net.arch, "all", 0.5)
    k0 = prune_to_shape(net, target, "random", seed=0, return_kept=True)[1]
    assert k0 == prune_to_shape(net, target, "random", seed=0, return_kept=True)[1]
    assert k0 != prune_to_shape(net, target, "random", seed=1, return_kept=True)[1]


def test_invalid_targets_are_rejected():
    net = tiny_net()
    wider = [list(s) for s in net.arch.hidden]
    wider[2][1] += 1
    with pytest.raises(ValueError, match="pruning only shrinks"):
        prune_to_shape(net, wider, "l1")
    with pytest.raises(ValueError, match="depth"):
        prune_to_shape(net, [[4, 4], [8, 8], [12]], "l1")
    with pytest.raises(ValueError, match="not among the blocks"):
        prune_to_shape(net, shape_for_gamma(net.arch, "all", 0.5), "l1", blocks=[LAST])
    with pytest.raises(ValueError, match="calibration"):
        prune_to_gamma(net, [LAST], 0.5, "taylor")
    with pytest.raises(ValueError, match="criterion"):
        prune_to_gamma(net, [LAST], 0.5, "l3")
    with pytest.raises(ValueError, match="unknown blocks"):
        shape_for_gamma(net.arch, ["layer3.2"], 0.5)


def test_cached_eval_and_pruning_curve(tmp_path):
    net = tiny_net()
    batches = [images(10, seed=s) for s in (5, 6)]
    full, cached = CachedEval(net, batches), CachedEval(net, batches, start=LAST)
    pruned = prune_to_gamma(net, [LAST], 0.5, "l1")
    assert cached(net) == full(net) and cached(pruned) == full(pruned)
    with pytest.raises(ValueError, match="differs from the base"):
        cached(prune_to_gamma(net, "all", 0.5, "l1"))
    rows = pruning_curve(net, [LAST], [0.0, 0.5, 0.9], ["l1", "taylor"], cached, calib_batches())
    assert [(r["criterion"], r["gamma"]) for r in rows] == [
        (c, g) for c in ("l1", "taylor") for g in (0.0, 0.5, 0.9)
    ]
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    assert rows[0]["acc"] == rows[3]["acc"] == full(net)
    assert [r["widths"] for r in rows[:3]] == [[12], [6], [1]]
    path = tmp_path / "curve.csv"
    write_curve_csv(rows[:3], path)
    write_curve_csv(rows[3:], path, merge=True)
    back = read_curve_csv(path)
    assert [(r["criterion"], r["gamma"], r["acc"]) for r in back] == [
        (r["criterion"], r["gamma"], r["acc"]) for r in rows
    ]


# ----------------------------------------------------------------------------------------------
# Slimmable
# ----------------------------------------------------------------------------------------------


def test_slimmable_materialized_networks_have_the_declared_shapes(tmp_path):
    net = tiny_net()
    slim = SlimmableResNet(copy.deepcopy(net), "all").eval()
    x, _ = images(4)
    assert torch.equal(slim(x), net(x))
    for gamma in (0.0, 0.25, 0.5, 0.75):
        hidden = slim.shape_for_gamma(gamma)
        m = slim.materialize(hidden)
        assert isinstance(m, CifarResNet) and m.arch.hidden == hidden
        torch.testing.assert_close(m(x), slim(x, hidden))
        # the first d channels are shared
        d = hidden[2][1]
        assert torch.equal(
            m.get_submodule(f"{LAST}.conv1").weight, net.get_submodule(f"{LAST}.conv1").weight[:d]
        )
        assert metamorph.load(save_model(m, tmp_path / f"s{gamma}")).arch.hidden == hidden


def test_slimmable_gradients_and_bn_updates_stay_in_the_slice():
    net = tiny_net()
    slim = SlimmableResNet(net, [LAST]).train()
    hidden = slim.shape_for_ratio(0.5)
    d = hidden[2][1]
    bn = net.get_submodule(f"{LAST}.bn1")
    before = bn.running_mean.clone()
    slim(images(4)[0], hidden).sum().backward()
    g = net.get_submodule(f"{LAST}.conv1").weight.grad
    assert g[:d].abs().sum() > 0 and g[d:].abs().sum() == 0
    assert not torch.equal(bn.running_mean[:d], before[:d])
    assert torch.equal(bn.running_mean[d:], before[d:])


def test_sandwich_visits_min_and_max():
    s = SandwichSampler([0.5, 0.75, 1.0], num_random=1)
    for step in range(5):
        widths = s(step)
        assert widths[:2] == [1.0, 0.5] and widths[2] == 0.75
    u = SandwichSampler([0.25, 1.0], num_random=2, mode="uniform", full=12, seed=3)
    draws = [u(step) for step in range(6)]
    assert all(d[:2] == [1.0, 0.25] and len(d) == 4 for d in draws)
    assert all(3 <= round(r * 12) <= 12 for d in draws for r in d[2:])
    assert draws == [u(step) for step in range(6)]  # seeded by the step (resumable)


def test_sandwich_training_step_visits_min_and_max():
    from metamorph.tasks.slimmable import SlimmableModule

    cfg = SlimmableConfig(blocks=[LAST], train_widths=[0.5, 0.75, 1.0], num_random=1)
    module = SlimmableModule(
        SlimmableResNet(tiny_net().train(), cfg.blocks), cfg, OptimConfig(), SchedulerConfig()
    )
    x, y = images(6)
    with pytest.warns(UserWarning):  # self.log without a trainer
        loss = module.training_step((x, y), 0)
    assert module.last_ratios[:2] == [1.0, 0.5] and module.last_ratios[2] == 0.75
    loss.backward()
    assert torch.isfinite(loss)


def test_slimmable_recalibration_batches_are_augmented_as_in_training():
    """calib_augment: the BN recalibration batches are the seeded training images crop+flip
    augmented (the statistics the weights were trained with); off: the plain images."""
    from metamorph.data import CIFARDataModule
    from metamorph.data.transforms import normalize, random_crop_flip
    from metamorph.tasks.slimmable import SlimmableModule

    dm = CIFARDataModule(root="embedded:cifar10-mini", val_size=20, train_subset=48, batch_size=16)
    dm.setup("fit")
    cfg = SlimmableConfig(blocks=[LAST], train_widths=[0.5, 1.0], calib_batch_size=16)
    module = SlimmableModule(
        SlimmableResNet(tiny_net(), cfg.blocks), cfg, OptimConfig(), SchedulerConfig()
    )
    x, _ = dm.subset("train", 32, seed=3)
    got = torch.cat([b[0] for b in module.calibration_batches(2, dm=dm, seed=3)])
    g = torch.Generator().manual_seed(3)
    expect = normalize(random_crop_flip(x, padding=4, generator=g), dm.mean, dm.std)
    torch.testing.assert_close(got, expect)
    module.cfg.calib_augment = False
    plain = torch.cat([b[0] for b in module.calibration_batches(2, dm=dm, seed=3)])
    torch.testing.assert_close(plain, normalize(x, dm.mean, dm.std))
    assert not torch.allclose(plain, got)


def test_bn_recalibration_changes_running_stats():
    net = tiny_net()
    slim = SlimmableResNet(net, "all")
    hidden = slim.shape_for_gamma(0.5)
    stale = slim.materialize(hidden).state_dict()
    batches = [images(8, seed=s)[0] * 2 + 1 for s in range(3)]
    stats = slim.calibrate(hidden, batches)
    assert slim.is_calibrated(hidden)
    fresh = slim.materialize(hidden)
    for k, v in stats.items():
        assert torch.equal(fresh.state_dict()[k], v)
        if k.endswith("running_mean"):
            assert not torch.allclose(v, stale[k]), k
    # cumulative average: the stem's BN mean is the mean of its inputs over all batches
    with torch.no_grad():
        stem = torch.cat([fresh.conv1(b) for b in batches])
    torch.testing.assert_close(fresh.bn1.running_mean, stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.equal(
        slim.materialize(hidden, use_calibrated=False).state_dict()[f"{LAST}.bn1.running_mean"],
        stale[f"{LAST}.bn1.running_mean"],
    )


def test_sort_hidden_channels_keeps_the_function():
    net = tiny_net()
    x, _ = images(3)
    before = net(x)
    sort_hidden_channels(net, "all")
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    l1 = net.get_submodule(f"{LAST}.conv1").weight.abs().flatten(1).sum(1)
    assert torch.all(l1[:-1] >= l1[1:])


def test_slimmable_rejects_folded_networks():
    with pytest.raises(ValueError, match="BatchNorm"):
        SlimmableResNet(tiny_net(bn=False))


# ----------------------------------------------------------------------------------------------
# End to end: slimmable task, individual baseline, table
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("baselines")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAMORPH_SHARED", str(d / "no-shared"))
        mp.setenv("METAMORPH_CACHE", str(d / "cache"))
        yield d


@pytest.fixture(scope="module")
def base_file(workdir) -> Path:
    """A tiny ResNet (2 blocks per stage, widths 4/8/12) as a model file, BN present."""
    return save_model(tiny_net(seed=4), workdir / "base")


@pytest.fixture(scope="module")
def slim_run(workdir, base_file) -> dict:
    out = workdir / "slim"
    cfg = compose_config(
        "train",
        out,
        [
            "task=slimmable",
            *TINY_RUN,
            f"model.init={base_file}",
            f"task.blocks=[{LAST}]",
            "task.reorder=l1",
            "task.calib_batches=2",
            "task.val_calib_batches=1",
        ],
    )
    return {"summary": run(cfg), "out": out}


def test_slimmable_task_end_to_end(slim_run):
    from metamorph.tasks.slimmable import load_slimmable_checkpoint

    s, out = slim_run["summary"], slim_run["out"]
    assert s["task"] == "slimmable" and s["global_step"] == 3
    assert set(s["test_sweep"]) == {"g0", "g0.25", "g0.5", "g0.75"}
    assert all(0 <= v <= 100 for v in s["test_sweep"].values())
    assert json.loads((out / "summary.json").read_text())["time_s"] == s["time_s"]
    module = load_slimmable_checkpoint(s["checkpoint"])
    slim = module.net
    widths = {g: slim.shape_for_gamma(g) for g in (0.0, 0.25, 0.5, 0.75)}
    assert all(slim.is_calibrated(h) for h in widths.values())  # stored in the checkpoint
    for g, hidden in widths.items():
        m = metamorph.load(s["models"][f"g{g:g}"])
        assert m.arch.hidden == hidden and hidden[2][1] == max(1, round(12 * (1 - g)))
        x, _ = images(2, size=32)
        torch.testing.assert_close(m(x), slim.materialize(hidden)(x))
    with pytest.raises(ValueError, match="not a slimmable checkpoint"):
        bogus = out / "bogus.ckpt"
        torch.save({"hyper_parameters": {}, "state_dict": {}}, bogus)
        load_slimmable_checkpoint(bogus)


def test_slimmable_experiments_compose(workdir):
    for exp in (
        "baselines/paper/slimmable_resnet20_cifar10",
        "baselines/recipe/slimmable_resnet20_cifar10_cpu",
    ):
        cfg = compose_config("train", workdir / "c", [f"experiment={exp}"])
        assert cfg.task.name == "slimmable" and cfg.task.blocks == ["layer3.2"]
        assert list(cfg.task.train_widths) == [0.5, 0.75, 1.0]
    assert cfg.model.init.endswith("outputs/models/resnet20_ft.json")


@pytest.fixture(scope="module")
def individual_run(workdir, base_file) -> dict:
    from metamorph.baselines.individual import run_individual

    out = workdir / "individual"
    cfg = compose_config(
        "train",
        out,
        [
            "experiment=baselines/recipe/individual_resnet20_cifar10_cpu",
            *TINY_RUN,
            *TINY_MODEL,
            f"individual.base={base_file}",
            f"individual.blocks=[{LAST}]",
            "individual.gamma=0.5",
            "+trainer.limit_train_batches=2",
        ],
    )
    assert cfg.model.init == cfg.individual.pruned + ".json"
    return {"summary": run_individual(cfg), "out": out, "cfg": cfg}


def test_individual_baseline_prunes_then_fine_tunes(individual_run, base_file):
    s, cfg = individual_run["summary"], individual_run["cfg"]
    target = shape_for_gamma(metamorph.load(base_file).arch, [LAST], 0.5)
    assert s["task"] == "individual" and s["hidden"] == target and s["global_step"] == 2
    pruned = metamorph.load(s["pruned_model"])
    tuned = metamorph.load(s["exported"])
    assert pruned.arch.hidden == tuned.arch.hidden == target
    assert s["exported"] == cfg.export_to + ".json"
    assert (individual_run["out"] / "summary.json").exists()
    # the fine-tune changed the pruned weights
    assert not torch.equal(pruned.state_dict()["fc.weight"], tuned.state_dict()["fc.weight"])


def test_individual_scratch_config_builds_the_shape(workdir):
    from metamorph.runtime.networks import build_model

    hidden = [[16, 16, 16], [32, 32, 32], [64, 64, 48]]
    cfg = compose_config(
        "train",
        workdir / "c",
        ["experiment=baselines/paper/individual_resnet20_cifar10", f"model.kwargs.hidden={hidden}"],
    )
    assert cfg.trainer.max_epochs == 200 and cfg.task.optim.lr == 0.1
    assert cfg.task.scheduler.name == "cosine" and cfg.model.init is None
    assert build_model(cfg.model, num_classes=10).arch.hidden == hidden


def _neumeta_ckpt(
    workdir: Path, base_file: Path, blocks: str = LAST, extra: tuple = (), name: str = "neumeta"
) -> Path:
    """A (untrained) NeuMeta checkpoint over the tiny base, in the format task=metamorph writes."""
    from metamorph.hypernet.metanet import MetaResNet
    from metamorph.runtime.summary import plain
    from metamorph.tasks.metamorph import MetamorphModule
    from metamorph.tasks.metamorph_train import metamorph_config, prepare_base

    cfg = compose_config(
        "train",
        workdir / "nm",
        [
            "task=metamorph",
            f"task.base={base_file}",
            f"task.scope.blocks=[{blocks}]",
            "task.eval_k=2",
            *extra,
            "hypernet=small",
            "hypernet.hidden=8",
            "hypernet.layers=1",
            "hypernet.freqs=2",
            *TINY_MODEL,
        ],
    )
    mcfg = metamorph_config(cfg)
    prepared, _ = prepare_base(metamorph.load(base_file), fold=True, permute=False, time_limit=0.01)
    module = MetamorphModule(MetaResNet(prepared, mcfg.spec, mcfg.inr), mcfg, hparams=plain(cfg))
    path = workdir / f"{name}.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def _table_module(name: str = "table_neumeta"):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_script_on_tiny_inputs(workdir, base_file, slim_run, individual_run, tmp_path):
    table = _table_module()
    out = tmp_path / "table"
    summary_file = individual_run["out"] / "summary.json"
    s = table.main(
        [
            "--base", str(base_file),
            "--individual", f"0.5={individual_run['summary']['exported']}", f"0.75={tmp_path / 'missing.json'}",
            "--slimmable", slim_run["summary"]["checkpoint"],
            "--neumeta", str(_neumeta_ckpt(workdir, base_file)),
            "--blocks", LAST,
            "--criteria", "l1", "random", "hessian",
            "--curve-gammas", "0:0.5:0.25",
            "--calib-batches", "1", "--calib-batch-size", "8",
            "--data-root", "embedded:cifar10-mini", "--test-subset", "30", "--batch-size", "16",
            "--summary", f"individual={summary_file.parent}/summ*.json", f"individual={summary_file}", "--cost", "neumeta=1.5",
            "--out", str(out),
        ]
    )  # fmt: skip
    for f in ("table2.csv", "table2.md", "table2.png", "pruning_curves.csv"):
        assert (out / f).stat().st_size > 0, f
    t = s["table"]
    assert t["Individual@0"] is not None and t["Individual@0.5"] is not None
    assert t["Individual@0.25"] is None and t["Individual@0.75"] is None
    assert all(
        t[f"{m}@{g:g}"] is not None for m in ("Slimmable", "NeuMeta") for g in (0, 0.25, 0.5, 0.75)
    )
    md = (out / "table2.md").read_text()
    assert "not run" in md and "92.60 / 90.65 / 89.57 / 87.04" in md and "| 1.5 |" in md
    assert "Pruning L1" in md and "Pruning L2 (no fine-tuning) | not run" in md
    curve = read_curve_csv(out / "pruning_curves.csv")
    assert len(curve) == 9 and {r["criterion"] for r in curve} == {"l1", "random", "hessian"}
    rows = list(__import__("csv").DictReader(open(out / "table2.csv")))
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok", "not run"}
    cost = float(next(r for r in rows if r["method"] == "Individual")["cost_cpu_min"])
    assert cost == pytest.approx(json.loads(summary_file.read_text())["time_s"] / 60)
    # reusing the curve CSV, nothing else given: every method row is "not run"
    s2 = table.main(
        [
            "--pruning-csv",
            str(out / "pruning_curves.csv"),
            "--data-root",
            "embedded:cifar10-mini",
            "--test-subset",
            "10",
            "--out",
            str(tmp_path / "t2"),
        ]
    )
    assert all(v is None for v in s2["table"].values())
    assert read_curve_csv(tmp_path / "t2" / "pruning_curves.csv") == curve


def test_full_network_table_script_on_tiny_inputs(
    workdir, base_file, slim_run, individual_run, tmp_path
):
    table = _table_module("table_full_network")
    ckpt = _neumeta_ckpt(
        workdir, base_file, blocks="all", extra=("task.scope.depth_choices=[1,2]",), name="full"
    )
    out = tmp_path / "full"
    s = table.main(
        [
            "--base", str(base_file),
            "--metamorph", f"tiny-full={ckpt}", f"absent={tmp_path / 'absent.ckpt'}",
            "--individual", f"0.5={individual_run['summary']['exported']}", f"0.75={tmp_path / 'no.json'}",
            "--slimmable", slim_run["summary"]["checkpoint"],
            "--data-root", "embedded:cifar10-mini", "--test-subset", "30", "--batch-size", "16",
            "--calibrate", "32", "--out", str(out),
        ]
    )  # fmt: skip
    for f in ("table.csv", "table.md", "table.png", "pruning_l1.csv"):
        assert (out / f).stat().st_size > 0, f
    t = s["table"]
    cols = ("g0", "g0.25", "g0.5", "g0.625", "g0.75", "d2", "d1", "x1.25")
    assert all(t[f"tiny-full@{c}"] is not None for c in cols)
    assert all(t[f"tiny-full + calibration@{c}"] is not None for c in cols)
    assert all(t[f"absent@{c}"] is None for c in cols)
    assert t["Base network@g0"] is not None and t["Individually fine-tuned@g0.5"] is not None
    assert t["Individually fine-tuned@g0.75"] is None
    assert all(t[f"Slimmable@g{g:g}"] is not None for g in (0, 0.25, 0.5, 0.625, 0.75))
    assert t["Slimmable@d1"] is None and t["L1 pruning, no fine-tuning@g0.75"] is not None
    # the gamma-0 pruned network is the base itself
    assert t["L1 pruning, no fine-tuning@g0"] == t["Base network@g0"]
    checks = s["targets"]["tiny-full"]
    assert any(c.startswith("γ=0 within 1.0 of the base: ") for c in checks)
    assert any("g0.25 within 1.0 of individually fine-tuned: no baseline" in c for c in checks)
    assert any(c.startswith("g0.75 above slimmable: ") and "baseline" not in c for c in checks)
    md = (out / "table.md").read_text()
    assert "| Slimmable |" in md and "not run" in md and "Targets, tiny-full:" in md
