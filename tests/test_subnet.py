"""The sub-network family protocol over every registered family (timm-style), the shared
building blocks of the models layer, and ``metamorph-eval`` on a slimmable checkpoint and on a
GeneCAI model file through the common path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_DATA, compose_config

import metamorph
import metamorph.hypernet.metanet  # noqa: F401  (each import registers its families)
import metamorph.methods.nnfactory  # noqa: F401
import metamorph.search  # noqa: F401
from metamorph.baselines.slimmable import SlimmableConfig, SlimmableResNet
from metamorph.cli import evaluate
from metamorph.io.model_file import save_model
from metamorph.models.metrics import top1
from metamorph.models.segments import Suffix, capture, forward_from, forward_to
from metamorph.models.subnet import as_lists, check_hidden, subnet_families
from metamorph.search.spaces import DecompositionSpace
from metamorph.tasks.slimmable import CKPT_KEY, SlimmableModule

FAMILIES = subnet_families()

# A bad descriptor per family and what its error must name (the valid choices): a family
# registered without an entry here fails test_every_family_has_a_bad_descriptor_case.
BAD = {
    "single": ("half", r"only 'full'"),
    "slimmable": ([[4], [8], [0]], r"width 0 of layer3\.0 is outside the supported range 1\.\.8"),
    "metamorphic": ([[4], [8], [99]], r"width 99 of layer3\.0 .*range 1\.\.16"),
    "metamorphic_search": ([[4], [8], [1]], r"width 1 of layer3\.0 .*range 4\.\.8"),
    "pruned": ([[4], [8, 8], [8]], r"stage 2 keeps 2 blocks; allowed only 1"),
    "lowrank": ([(8, 8)], r"one \(r_in, r_out\) pair per decomposable conv \(\d+: \["),
    "nnfactory": ([1, 0, 1], r"mask has 3 entries; the supernet has 15 modules"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param].example()


def members(fam) -> list:
    rng = np.random.default_rng(0)
    out = [fam.full(), *(fam.sample(rng) for _ in range(3))]
    try:
        out.append(fam.for_ratio(0.5))
    except ValueError:  # a family without a uniform ratio says so
        pass
    return out


def test_every_family_has_a_bad_descriptor_case():
    assert set(FAMILIES) == set(BAD)


def test_validate_rejects_bad_descriptors_naming_the_valid_choices(family):
    desc, message = BAD[family.family_name]
    with pytest.raises(ValueError, match=message):
        family.validate(desc)


def test_materialize_equals_the_familys_own_forward(family):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for desc in members(family):
        net = family.materialize(desc)
        assert isinstance(net, torch.nn.Module)
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x), family.forward_at(x, desc))
            torch.testing.assert_close(family.forward_fn(desc)(x), net(x))


def test_costs_count_the_materialized_parameters(family):
    for desc in members(family):
        net = family.materialize(desc)
        c = family.costs(desc)
        assert c["params"] == sum(p.numel() for p in net.parameters())
        assert c["flops"] > 0


def test_descriptors_and_descriptions_round_trip_through_json(family):
    for desc in members(family):
        hash(desc)  # hashable
        canon = family.validate(desc)
        assert family.validate(json.loads(json.dumps(canon))) == canon
        d = family.describe(desc)
        assert d["family"] == family.family_name if "family" in d else True
        assert json.loads(json.dumps(d)) == d


def test_sampling_is_seeded_and_stays_in_the_space(family):
    a = [family.sample(np.random.default_rng(7)) for _ in range(2)]
    b = [family.sample(np.random.default_rng(7)) for _ in range(2)]
    assert a == b
    assert all(family.validate(d) == d for d in a)


def test_one_shape_check_for_every_width_family():
    base = [[16, 16], [32, 32]]
    check_hidden([[8, 16], [32]], base, {"layer1.0": (1, 16), "layer2.1": (1, 32)}, min_depth=1)
    with pytest.raises(ValueError, match="layer2.0 is not metamorphic.*metamorphic blocks"):
        check_hidden([[8, 16], [30, 32]], base, {"layer1.0": (1, 16)}, None, "metamorphic")
    with pytest.raises(ValueError, match="shape has 1 stages; the network has 2"):
        check_hidden([[8, 16]], base, {}, None)
    with pytest.raises(ValueError, match="not an integer"):
        check_hidden([[8.5, 16], [32, 32]], base, {"layer1.0": (1, 16)})


# ----------------------------------------------------------------------------------------------
# Shared building blocks
# ----------------------------------------------------------------------------------------------


def test_block_range_forward_capture_and_accuracy():
    net = FAMILIES["single"].example().model
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = forward_to(net, "layer2.0", x)
        torch.testing.assert_close(forward_from(net, "layer2.0", h), net(x))
        torch.testing.assert_close(Suffix(net, "layer2.0")(h), net(x))
        with capture(net, ["layer2.0"], what="input") as seen:
            net(x)
        torch.testing.assert_close(seen["layer2.0"], h)
    with pytest.raises(ValueError, match="no block 'layer9.0'"):
        forward_to(net, "layer9.0", x)
    y = net(x).argmax(1)
    assert top1(net, [(x, y)]) == 100.0
    assert top1(net, [(x[:2], y[:2]), (x[2:], (y[2:] + 1) % 10)]) == 50.0


def test_lowrank_model_files_load_without_importing_search(tmp_path):
    import subprocess
    import sys

    space = DecompositionSpace.example()
    desc = space.sample(np.random.default_rng(3))
    path = save_model(space.materialize(desc), tmp_path / "front_0", meta={"src": "test"})
    assert json.loads(path.read_text())["family"] == "cifar_resnet_lowrank"
    code = (
        "import sys, metamorph; m = metamorph.load(sys.argv[1]); "
        "assert not [k for k in sys.modules if k.startswith('metamorph.search')]; "
        "print(sum(p.numel() for p in m.parameters()))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == space.costs(desc)["params"]


# ----------------------------------------------------------------------------------------------
# metamorph-eval through the common path
# ----------------------------------------------------------------------------------------------


def _eval(tmp_path, *overrides):
    cfg = compose_config(
        "eval",
        tmp_path,
        [*TINY_DATA, "split=val", "device=cpu", "latency=false", *overrides],
    )
    return evaluate.run(cfg)


@pytest.fixture(scope="module")
def slimmable_ckpt(tmp_path_factory):
    """A tiny slimmable checkpoint as task=slimmable writes it, BN statistics stored for the
    full width only (the others are recalibrated by metamorph-eval)."""
    from metamorph.config.schema import OptimConfig, SchedulerConfig

    slim = SlimmableResNet.example()
    cfg = SlimmableConfig(blocks=["all"], calib_batches=2, eval_gammas=[0.0])
    module = SlimmableModule(slim, cfg, OptimConfig(), SchedulerConfig())
    slim.calibrated[json.dumps(slim.full_shape)] = {
        k: v.clone() for k, v in slim.net.state_dict().items() if "running" in k
    }
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt[CKPT_KEY]
    path = tmp_path_factory.mktemp("slim") / "slimmable.ckpt"
    torch.save(ckpt, path)
    return path


def test_eval_sweeps_a_slimmable_checkpoint(slimmable_ckpt, tmp_path):
    out = tmp_path / "sweep"
    s = _eval(tmp_path, f"src={slimmable_ckpt}", f"out_dir={out}", "sweep.gammas=[0,0.5,0.75]")
    assert s["kind"] == "slimmable" and s["images"] == 20
    assert [p["label"] for p in s["points"]] == ["g0", "g0.5", "g0.75"]
    assert [p["hidden"] for p in s["points"]][1:] == [[[2], [4], [4]], [[1], [2], [2]]]
    assert [p["seen"] for p in s["points"]] == [True, True, False]  # trained widths 0.5..1
    slim = SlimmableResNet.example()
    assert s["points"][2]["params"] == slim.costs([[1], [2], [2]])["params"]
    md = (out / "sweep.md").read_text()
    assert "widths without stored statistics recalibrated on 2 train batches (crop+flip" in md
    assert (out / "acc_vs_gamma.png").is_file()
    with pytest.raises(ValueError, match=r"sweep.k=2 applies to metamorphic checkpoints only"):
        _eval(tmp_path, f"src={slimmable_ckpt}", f"out_dir={tmp_path / 'o2'}", "sweep.k=2")
    with pytest.raises(ValueError, match=r"stage 1 keeps 0 blocks|allowed only 1"):
        _eval(tmp_path, f"src={slimmable_ckpt}", f"out_dir={tmp_path / 'o3'}", "sweep.depths=[0]")


def test_eval_scores_a_genecai_model_file(tmp_path):
    space = DecompositionSpace.example()
    desc = space.sample(np.random.default_rng(5))
    net = space.materialize(desc)
    path = save_model(net, tmp_path / "front_0")
    s = _eval(tmp_path, f"src={path}")
    assert s["images"] == 20 and 0 <= s["acc"] <= 100
    assert s["params"] == space.costs(desc)["params"]
    assert s["flops"] == space.costs(desc)["flops"]
    loaded = metamorph.load(path)
    assert as_lists(loaded.arch.hidden) == as_lists(space.arch.hidden)
