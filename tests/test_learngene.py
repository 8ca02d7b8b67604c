"""Learngene Pool and SN-Net: auxiliary distillation, stitch init, descendants, the two tasks and
customization (tiny networks, synthetic or embedded mini data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import QUIET, TINY_DATA, compose_config, randomize_bn

from metamorph.cli import train
from metamorph.methods.learngene.auxiliary import (
    AuxDistiller,
    auxiliary_arch,
    auxiliary_network,
    supervision_pairs,
)
from metamorph.methods.learngene.module import draw_path
from metamorph.methods.learngene.pool import (
    StitchedSystem,
    initialize_stitches,
    load_system,
    save_system,
)
from metamorph.methods.learngene.stitch import init_least_squares, least_squares
from metamorph.models import CifarResNet, cifar_resnet_arch
from metamorph.models.stitched import make_stitch
from metamorph.utils.profile import count_flops, count_params


def ancestry(seed=0, per_stage=3, widths=(8, 16, 16)):
    torch.manual_seed(seed)
    net = CifarResNet(cifar_resnet_arch(depth=8, stage_widths=widths, blocks_per_stage=per_stage))
    return randomize_bn(net, seed).eval()


def pool_of(seed=0, blocks=6):
    anc = ancestry(seed)
    torch.manual_seed(seed + 1)
    tiny = randomize_bn(auxiliary_network(anc, 0.5, blocks), seed + 1)
    base = randomize_bn(auxiliary_network(anc, 1.0, blocks), seed + 2)
    return StitchedSystem([tiny, base], ["tiny", "base"]).eval(), tiny.eval(), base.eval()


def test_auxiliary_shapes_and_supervision_positions():
    arch = auxiliary_arch(ancestry().arch, 0.5, 6)
    assert arch.stage_widths == [4, 8, 8] and arch.hidden == [[4, 4], [8, 8], [8, 8]]
    assert supervision_pairs(6, 12, "front_end") == [(1, 3), (3, 7), (5, 11)]  # the paper's
    assert supervision_pairs(9, 27, "front_end") == [(2, 8), (5, 17), (8, 26)]  # stage ends
    assert supervision_pairs(6, 9, "end") == [(5, 8)]
    with pytest.raises(ValueError, match="multiple of 3"):
        auxiliary_arch(ancestry().arch, 0.5, 7)
    with pytest.raises(ValueError, match="positions"):
        supervision_pairs(6, 9, "middle")


def test_least_squares_stitch_reproduces_exactly_linear_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 4, 4, generator=g)
    w, b = torch.randn(10, 6, generator=g), torch.randn(10, generator=g)
    y = torch.einsum("oc,bchw->bohw", w, x) + b.view(1, -1, 1, 1)
    layer = make_stitch("conv1x1", 6, 10)
    init_least_squares(layer, [(x, y)])
    torch.testing.assert_close(layer(x), y, atol=1e-4, rtol=1e-4)
    w2, b2 = least_squares(torch.randn(50, 3, generator=g), torch.randn(50, 2, generator=g))
    assert w2.shape == (2, 3) and b2.shape == (2,)
    tokens = torch.randn(3, 7, 6, generator=g)  # ViT-style (B, N, D)
    lin = make_stitch("linear", 6, 4)
    target = tokens @ w[:4].T + b[:4]
    init_least_squares(lin, [(tokens, target)])
    torch.testing.assert_close(lin(tokens), target, atol=1e-4, rtol=1e-4)


def test_one_member_descendants_equal_that_auxiliary_model():
    system, tiny, base = pool_of()
    x = torch.randn(3, 3, 32, 32)
    alone = [d for d in system.descendants if not d.stitched]
    assert [d.front for d in alone] == [0, 1]
    torch.testing.assert_close(system(x, alone[0].id), tiny(x))
    torch.testing.assert_close(system(x, alone[1].id), base(x))
    torch.testing.assert_close(system.materialize(alone[0].id)(x), tiny(x))


def test_descendants_run_small_first_and_have_the_declared_costs():
    system, _, _ = pool_of()
    initialize_stitches(system, "snnet", torch.randn(8, 3, 32, 32))
    system.eval()
    costs = system.costs()
    x = torch.randn(2, 3, 32, 32)
    stitched = [d for d in system.descendants if d.stitched]
    # equal depth D = 6: 3D - 3 = 15 positions, minus 4 crossing a stage boundary
    assert len(stitched) == 11 and all(d.front == 0 and d.back == 1 for d in stitched)
    assert all(abs(d.back_start - d.front_blocks) <= 1 for d in stitched)
    for d in system.descendants:
        net = system.materialize(d.id)
        torch.testing.assert_close(net(x), system(x, d.id))
        assert costs[d.id] == {"params": count_params(net), "flops": count_flops(net)}, d
    sizes = [c["flops"] for c in costs]
    assert min(sizes) == costs[0]["flops"] and max(sizes) >= costs[1]["flops"]
    st = system.stored_params()
    assert st["total"] == count_params(system) == st["members"] + st["stitches"]


def test_transformation_layers_get_gradients_and_change():
    anc = ancestry()
    torch.manual_seed(0)
    d = AuxDistiller(auxiliary_network(anc, 0.5, 6), anc, "front_end")
    before = [p.detach().clone() for p in d.transforms.parameters()]
    opt = torch.optim.SGD([*d.student.parameters(), *d.transforms.parameters()], lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(2):
        opt.zero_grad()
        loss, parts = d.loss(x, y)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.transforms.parameters())
        assert all(p.grad is None for p in d.teacher.parameters())
        opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, d.transforms.parameters()))
    assert parts["rep"] > 0 and len(d.transforms.maps) == 3


def test_transposed_mean_init_copies_the_learned_maps():
    system, _, _ = pool_of()
    maps = {0: [torch.randn(4, 8), torch.randn(8, 16), torch.randn(8, 16)]}
    # tiny widths 4/8/8 vs base 8/16/16: stage-0 stitches get map 0^T, others the mean of 1, 2
    initialize_stitches(system, "ours", maps=maps)
    for d in system.descendants:
        if d.stitched:
            w = system.stitches[d.slot].weight[:, :, 0, 0]
            expect = maps[0][0].T if w.shape == (8, 4) else (maps[0][1] + maps[0][2]).T / 2
            torch.testing.assert_close(w, expect)
    with pytest.raises(ValueError, match="learned transformation maps"):
        initialize_stitches(system, "ours", maps={})
    with pytest.raises(ValueError, match="init="):
        initialize_stitches(system, "identity")


def test_fixed_seed_gives_the_same_path_sequence():
    paths = list(range(13))
    a = [draw_path(7, s, paths) for s in range(200)]
    assert a == [draw_path(7, s, paths) for s in range(200)]
    assert a != [draw_path(8, s, paths) for s in range(200)]
    assert set(a) == set(paths)  # uniform over every descendant
    assert a[120:] == [draw_path(7, s, paths) for s in range(120, 200)]  # resume mid-run


def test_bad_descendant_ids_fail_clearly():
    system, _, _ = pool_of()
    for bad in (-1, system.num_descendants, "3", 1.5):
        with pytest.raises(ValueError, match=r"ids 0\.\.12"):
            system(torch.randn(1, 3, 32, 32), bad)


def test_system_file_round_trips(tmp_path):
    system, _, _ = pool_of()
    initialize_stitches(system, "snnet", torch.randn(4, 3, 32, 32))
    path = save_system(system, tmp_path / "system", meta={"x": 1})
    back = load_system(path)
    x = torch.randn(2, 3, 32, 32)
    for d in (0, 1, 5, 12):
        torch.testing.assert_close(back(x, d), system.eval()(x, d))
    assert back.meta == {"x": 1} and back.names == ["tiny", "base"]
    with pytest.raises(FileNotFoundError, match="task=learngene_stitch"):
        load_system(tmp_path / "nothing")


def test_recalibrated_descendants_keep_their_own_bn_statistics_through_the_file(tmp_path):
    """Descendants share the members' BN layers: recalibrate(d) gives descendant d statistics of
    its own (the others untouched), and the system file and materialize() carry them."""
    system, _, _ = pool_of()
    initialize_stitches(system, "snnet", torch.randn(8, 3, 32, 32))
    system.eval()
    x = torch.randn(4, 3, 32, 32)
    images = [torch.randn(16, 3, 32, 32) * 3 + 1 for _ in range(2)]
    shared_before = system(x, 7)
    net = system.recalibrate(7, images)
    assert not torch.allclose(net(x), shared_before)  # its own statistics now
    torch.testing.assert_close(system(x, 7), shared_before)  # the shared layers are untouched
    torch.testing.assert_close(system.materialize(7)(x), net(x))
    torch.testing.assert_close(system.materialize(3)(x), system(x, 3))  # not recalibrated
    back = load_system(save_system(system, tmp_path / "system"))
    assert sorted(back.bn_stats) == [7]
    torch.testing.assert_close(back.materialize(7)(x), net(x))
    torch.testing.assert_close(back(x, 7), shared_before)


SHORT = [
    *TINY_DATA,
    *QUIET,
    "logger=none",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Ancestry file -> two auxiliary models (2 steps each) -> pool (2 steps) evaluated."""
    from metamorph.io.model_file import save_model

    root = tmp_path_factory.mktemp("lg")
    anc = save_model(ancestry(), root / "ancestry")
    aux = {}
    for name, width in (("tiny", 0.5), ("base", 1.0)):
        aux[name] = train.run(
            compose_config(
                "train",
                root / name,
                [*SHORT, "task=learngene_aux", f"task.ancestry={anc}", f"task.width={width}"],
            )
        )
    members = f"[{aux['tiny']['model_files'][0]},{aux['base']['model_files'][0]}]"
    pool = train.run(
        compose_config(
            "train",
            root / "pool",
            [
                *SHORT,
                "task=learngene_stitch",
                f"task.members={members}",
                f"task.ancestry={anc}",
                "task.latency=false",
            ],
        )
    )
    return root, anc, aux, pool


def test_the_two_stages_write_aux_models_maps_and_an_evaluated_system(stages):
    from metamorph.io.model_file import load_model
    from metamorph.methods.learngene.task import load_maps
    from metamorph.runtime.checkpoints import checkpoint_kind, load_checkpoint

    root, anc, aux, pool = stages
    tiny = load_model(aux["tiny"]["model_files"][0])
    assert tiny.arch.stage_widths == [4, 8, 8] and sum(map(len, tiny.arch.hidden)) == 6
    maps = load_maps(aux["tiny"]["model_files"][0])
    assert [tuple(m.shape) for m in maps] == [(4, 8), (8, 16), (8, 16)]
    ck = root / "tiny" / "checkpoints" / "last.ckpt"
    assert checkpoint_kind(ck) == "learngene_aux"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(load_checkpoint(ck)(x), tiny(x))
    table = json.loads(Path(pool["table"]).read_text())
    assert len(table["descendants"]) == pool["descendants"] == 13
    assert all("test_acc" in r and "val_acc" in r and r["flops"] > 0 for r in table["descendants"])
    assert pool["stitch_init"] and set(pool["stitch_init"].values()) == {"ours"}
    assert len(pool["val_acc_at_init"]) == 13 and pool["paths_drawn"] == 2
    system = load_system(pool["system_file"])
    assert checkpoint_kind(root / "pool" / "checkpoints" / "last.ckpt") == "learngene_stitch"
    resumed = load_checkpoint(root / "pool" / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(resumed(x, 7), system(x, 7))


def test_stitch_task_errors_name_the_fix(stages, tmp_path):
    root, anc, aux, _ = stages
    base = [*SHORT, "task=learngene_stitch", f"task.ancestry={anc}"]
    with pytest.raises(ValueError, match="at least two model files"):
        train.run(compose_config("train", tmp_path, [*base, f"task.members=[{anc}]"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.run(
            compose_config("train", tmp_path, [*base, f"task.members=[{anc},{tmp_path}/x.json]"])
        )
    # pretrained anchors have no learned maps: init=ours is refused, init=snnet works
    with pytest.raises(ValueError, match="init=snnet"):
        train.run(compose_config("train", tmp_path, [*base, f"task.members=[{anc},{anc}]"]))


def test_fine_tune_trains_the_members_in_train_mode(stages):
    from metamorph.io.model_file import load_model

    _, _, aux, pool = stages
    tiny = load_model(aux["tiny"]["model_files"][0])
    system = load_system(pool["system_file"])
    # BatchNorm statistics moved: the members were fine-tuned in train mode
    assert not torch.equal(system.members[0].stem.bn1.running_mean, tiny.bn1.running_mean)
    assert len(pool["val_acc_at_init_lsinit"]) == 13  # both inits compared before training


def _customize(pool, out, *overrides):
    from metamorph.runtime.customizers import get_customizer

    cfg = compose_config(
        "customize",
        out.parent,
        ["method=learngene", f"learngene.pool={pool['system_file']}", f"out={out}", *overrides],
    )
    return get_customizer("learngene")(cfg)


def test_customize_picks_the_best_descendant_within_the_flop_budget(stages, tmp_path):
    from metamorph.io.model_file import load_model

    _, _, _, pool = stages
    table = json.loads(Path(pool["table"]).read_text())["descendants"]
    limit = sorted(r["flops"] for r in table)[4]
    out = tmp_path / "m"
    s = _customize(pool, out, f"budget.max_flops={limit}", "device=null", "learngene.onnx=false")
    feasible = [r for r in table if r["flops"] <= limit]
    best = max(feasible, key=lambda r: (r["val_acc"], -r["flops"], -r["params"]))
    assert s["flops"] <= limit and s["val_acc"] == best["val_acc"]
    net = load_model(s["model_file"])
    system = load_system(pool["system_file"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x), system(x, s["descendant"]))
    assert count_flops(net) == s["flops"]


def test_customize_exports_onnx_of_a_stitched_descendant(stages, tmp_path):
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort

    from metamorph.io.model_file import load_model

    _, _, _, pool = stages
    out = tmp_path / "d7"
    s = _customize(pool, out, "learngene.descendant=7", "device=null")
    assert s["descendant"] == 7 and Path(s["onnx"]).is_file()
    net = load_model(s["model_file"])
    x = torch.rand(2, 3, 32, 32)
    sess = ort.InferenceSession(s["onnx"], providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    mean = torch.tensor(net.arch.mean).view(1, 3, 1, 1)
    std = torch.tensor(net.arch.std).view(1, 3, 1, 1)
    np.testing.assert_allclose(got, net((x - mean) / std).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_customize_bad_ids_and_impossible_budgets_fail_clearly_and_write_nothing(stages, tmp_path):
    from metamorph.devices import BudgetError

    _, _, _, pool = stages
    out = tmp_path / "x" / "m"
    with pytest.raises(ValueError, match=r"ids 0\.\.12"):
        _customize(pool, out, "learngene.descendant=99", "device=null")
    with pytest.raises(BudgetError, match="descendant"):
        _customize(pool, out, "budget.max_flops=1000", "device=null")
    with pytest.raises(ValueError, match="learngene.pool= is required"):
        _customize({"system_file": "null"}, out, "budget.max_flops=1e9")
    assert not (tmp_path / "x").exists()


def _vit(width: int, heads: int, depth: int, seed: int):
    from metamorph.models import CifarViT, ViTArch

    torch.manual_seed(seed)
    return CifarViT(ViTArch(embed_dim=width, num_heads=heads, depth=depth, patch_size=8)).eval()


def test_vit_family_distils_with_attention_maps_and_stitches_linearly():
    anc = _vit(16, 2, 6, 0)
    tiny = auxiliary_network(anc, 0.5, 3)
    assert (tiny.arch.embed_dim, tiny.arch.num_heads, tiny.arch.depth) == (8, 1, 3)
    d = AuxDistiller(tiny, anc, "front_end")
    assert d.attention and len(d.transforms.attn_maps) == 3
    loss, parts = d.loss(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    loss.backward()
    assert parts["att"] > 0
    assert all(p.grad is not None for p in d.transforms.attn_maps.parameters())
    base = auxiliary_network(anc, 1.0, 3)
    system = StitchedSystem([tiny.eval(), base.eval()], ["tiny", "base"]).eval()
    stitched = [x for x in system.descendants if x.stitched]
    assert len(stitched) == 3 * 3 - 3  # k in {j, j+1, j+2} within the back's blocks
    x = torch.randn(2, 3, 32, 32)
    initialize_stitches(system, "ours", maps={0: d.transforms.learned_maps()})
    initialize_stitches(system, "snnet", x)
    costs = system.costs()
    torch.testing.assert_close(system(x, 0), tiny(x))
    for desc in system.descendants:
        net = system.materialize(desc.id).eval()
        torch.testing.assert_close(net(x), system(x, desc.id))
        assert costs[desc.id] == {"params": count_params(net), "flops": count_flops(net)}


def test_ancestry_init_copies_evenly_spaced_blocks_and_needs_full_width():
    from metamorph.methods.learngene.auxiliary import evenly_spaced, inherit_from_ancestry

    assert evenly_spaced(2, 9) == [0, 8] and evenly_spaced(3, 9) == [0, 4, 8]
    anc = ancestry(per_stage=3)
    student = auxiliary_network(anc, 1.0, 6)
    assert inherit_from_ancestry(student, anc) == [0, 2, 3, 5, 6, 8]
    a, s = anc.blocks(), student.blocks()
    torch.testing.assert_close(s[3].conv1.weight, a[5].conv1.weight)
    torch.testing.assert_close(student.fc.weight, anc.fc.weight)
    with pytest.raises(ValueError, match="task.width=1.0"):
        inherit_from_ancestry(auxiliary_network(anc, 0.5, 6), anc)


def test_logit_reduction_scales_the_kd_term():
    anc = ancestry()
    torch.manual_seed(0)
    student = auxiliary_network(anc, 0.5, 6)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    mean = AuxDistiller(student, anc, logit_reduction="mean").loss(x, y)[1]["logit"]
    per_image = AuxDistiller(student, anc, logit_reduction="batchmean").loss(x, y)[1]["logit"]
    torch.testing.assert_close(per_image, mean * 10)  # 10 classes
    with pytest.raises(ValueError, match="logit_reduction"):
        AuxDistiller(student, anc, logit_reduction="sum")


def test_stitch_fine_tune_resumes_from_last_ckpt(stages, tmp_path):
    root, anc, aux, pool = stages
    members = f"[{aux['tiny']['model_files'][0]},{aux['base']['model_files'][0]}]"
    s = train.run(
        compose_config(
            "train",
            tmp_path,
            [
                *SHORT,
                "task=learngene_stitch",
                f"task.members={members}",
                f"task.ancestry={anc}",
                "task.latency=false",
                "task.evaluate=false",
                "trainer.max_epochs=2",
                f"ckpt_path={root / 'pool' / 'checkpoints' / 'last.ckpt'}",
            ],
        )
    )
    assert s["global_step"] == 4 and s["paths_drawn"] == 2  # steps 2, 3 only: continued


def test_frozen_bn_stats_keep_the_members_statistics_while_weights_train(stages, tmp_path):
    from metamorph.io.model_file import load_model

    root, anc, aux, _ = stages
    tiny = load_model(aux["tiny"]["model_files"][0])
    members = f"[{aux['tiny']['model_files'][0]},{aux['base']['model_files'][0]}]"
    common = [
        *SHORT,
        "task=learngene_stitch",
        f"task.members={members}",
        f"task.ancestry={anc}",
        "task.latency=false",
        "task.evaluate=false",
    ]
    out = train.run(compose_config("train", tmp_path / "frozen", [*common, "task.bn_stats=frozen"]))
    system = load_system(out["system_file"])
    assert torch.equal(system.members[0].stem.bn1.running_mean, tiny.bn1.running_mean)
    assert torch.equal(system.members[0].stem.bn1.running_var, tiny.bn1.running_var)
    assert not torch.equal(system.members[0].stem.conv1.weight, tiny.conv1.weight)
    with pytest.raises(ValueError, match="task.bn_stats='eval'; choose one of"):
        train.run(compose_config("train", tmp_path / "bad", [*common, "task.bn_stats=eval"]))


def test_customize_latency_budget_is_judged_by_the_budgets_fresh_measurement(
    stages, tmp_path, monkeypatch
):
    """The descendant is accepted on Budget.measure (the written file in fresh processes, as
    metamorph-profile measures it), not on an in-process figure; one over budget is passed over."""
    from types import SimpleNamespace

    from metamorph.devices import Budget

    _, _, _, pool = stages
    table = json.loads(Path(pool["table"]).read_text())["descendants"]
    flops = {r["params"]: r["flops"] for r in table}
    measured = []

    def fake(self, model):  # latency = MFLOPs, so the most accurate may measure over budget
        from metamorph.utils.profile import count_params

        ms = flops[count_params(model)] / 1e6
        measured.append(ms)
        return SimpleNamespace(latency_ms=ms, memory_mb=1.0)

    monkeypatch.setattr(Budget, "measure", fake)
    limit = sorted(r["flops"] for r in table)[6] / 1e6
    s = _customize(
        pool,
        tmp_path / "m",
        f"budget.max_latency_ms={limit}",
        "budget.latency_margin=0",
        "learngene.onnx=false",
    )
    assert measured and s["measured_latency_ms"] == round(measured[-1], 4) and measured[-1] <= limit
    assert all(m > limit for m in measured[:-1])


def test_comparison_source_gives_one_point_per_descendant(stages, tmp_path):
    from test_compare import comparison_cfg

    from metamorph.compare import read_points, run_comparison

    _, _, _, pool = stages
    system = load_system(pool["system_file"])
    costs = system.costs()
    methods = {
        "lg": {"source": "learngene", "args": {"system": pool["system_file"], "ids": [0, 7]}}
    }
    s = run_comparison(comparison_cfg(tmp_path, methods), log=lambda *_: None)
    assert s["points"] == 2 and s["missing"] == 0
    pts = read_points(tmp_path / "out" / "points" / "lg.csv")
    assert [json.loads(q.descriptor)["descendant"] for q in pts] == [0, 7]
    assert [q.params for q in pts] == [costs[0]["params"], costs[7]["params"]]
    bad = {"lg": {"source": "learngene", "args": {"system": pool["system_file"], "ids": [99]}}}
    with pytest.raises(ValueError, match=r"ids 0\.\.12"):
        run_comparison(comparison_cfg(tmp_path / "b", bad), log=lambda *_: None)


def test_stitch_task_bn_images_evaluates_descendants_with_their_own_statistics(stages, tmp_path):
    root, anc, aux, _ = stages
    members = f"[{aux['tiny']['model_files'][0]},{aux['base']['model_files'][0]}]"
    over = [
        *SHORT,
        "task=learngene_stitch",
        f"task.members={members}",
        f"task.ancestry={anc}",
        "task.latency=false",
        "task.bn_images=16",
        "task.evaluate_ids=[0,7]",
    ]
    out = train.run(compose_config("train", tmp_path / "bn", over))
    assert out["bn_recalibrated"] == [0, 7]
    rows = json.loads(Path(out["table"]).read_text())["descendants"]
    assert [r["bn_recalibrated"] for r in rows] == [True, True]
    assert sorted(load_system(out["system_file"]).bn_stats) == [0, 7]
