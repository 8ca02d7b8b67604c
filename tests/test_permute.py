"""Function-preserving channel permutation (metamorph.hypernet.permute)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from metamorph import create_model
from metamorph.hypernet import permute as P
from metamorph.hypernet.permute import (
    apply_permutations,
    channel_groups,
    group_features,
    path_cost,
    permute_for_smoothness,
    random_orders,
    smoothness_order,
    total_variation,
)
from metamorph.models import fold_batchnorm

TIME_LIMIT = 0.01

SHAPES = {
    "resnet20": dict(name="resnet20"),
    "resnet32": dict(name="resnet32"),
    "nonuniform": dict(name="resnet20", hidden=[[5, 16, 9], [32, 7, 20], [64, 3, 50]]),
    "widths": dict(name="resnet20", stage_widths=[8, 24, 40]),
    "fewer_blocks": dict(name="resnet20", hidden=[[4], [6, 5], [7]]),
    "two_stages": dict(name="resnet20", stage_widths=[6, 15], hidden=[[3, 4], [5]]),
    "skipinit": dict(name="resnet20", block_variant="skipinit", blocks_per_stage=2),
    "scaled": dict(name="resnet20", block_variant="scaled_shortcut", blocks_per_stage=2),
    "learnable": dict(name="resnet20", block_variant="learnable_shortcut", blocks_per_stage=2),
}
CASES = [
    (shape, sc, folded)
    for shape in SHAPES
    for sc in ("A", "B")
    for folded in (False, True)
    if not (shape == "resnet32" and (sc, folded) in (("A", False), ("B", True)))
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny convs: intra-op threading only adds overhead (a lot of it on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(shape: str, shortcut: str, folded: bool, seed: int = 0) -> nn.Module:
    kw = dict(SHAPES[shape])
    name = kw.pop("name")
    torch.manual_seed(seed)
    model = create_model(name, shortcut=shortcut, **kw)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)
        model.fc.bias.normal_()
        for name_, p in model.named_parameters():
            if p.dim() == 0:
                p.fill_(0.7 if name_.endswith("alpha") else 1.3)
    if folded:
        fold_batchnorm(model)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, nn.Conv2d):
                    mod.bias.add_(0.1 * torch.randn_like(mod.bias))
    return model.double().eval()


def logits(model: nn.Module) -> torch.Tensor:
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        return model.eval()(x)


def assert_same_function(a: nn.Module, b: nn.Module) -> None:
    ya, yb = logits(a), logits(b)
    assert ya.abs().max() > 0 and ya.std() > 0
    rel = (ya - yb).abs().max() / ya.abs().max()
    assert rel < 1e-5, rel


def changed(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("shape,shortcut,folded", CASES)
def test_random_permutation_preserves_function(shape, shortcut, folded):
    model = make_model(shape, shortcut, folded)
    groups = channel_groups(model)
    permuted = apply_permutations(
        make_model(shape, shortcut, folded),
        groups,
        random_orders(groups, torch.Generator().manual_seed(2)),
    )
    assert changed(model, permuted)
    assert_same_function(model, permuted)


@pytest.mark.parametrize("shape,shortcut,folded", CASES)
def test_smoothness_permutation_preserves_function(shape, shortcut, folded):
    model = make_model(shape, shortcut, folded)
    groups = channel_groups(model)
    shuffled = apply_permutations(
        make_model(shape, shortcut, folded),
        groups,
        random_orders(groups, torch.Generator().manual_seed(3)),
    )
    before = {k: v.clone() for k, v in shuffled.state_dict().items()}
    smooth, report = permute_for_smoothness(shuffled, time_limit=TIME_LIMIT)
    assert changed(shuffled, smooth)  # it did something ...
    assert_same_function(model, smooth)  # ... and the function is the same
    assert report.tv_after <= report.tv_before + 1e-12
    assert report.tv_before == pytest.approx(total_variation(shuffled))
    assert report.tv_after == pytest.approx(total_variation(smooth))
    assert [g.name for g in report.groups] == [g.name for g in groups]
    d = report.to_dict()
    assert set(d) >= {"tv_before", "tv_after", "groups"}
    for g, r in zip(groups, d["groups"]):
        assert sorted(r["order"]) == list(range(g.size))
        assert r["path_cost_after"] <= r["path_cost_before"] + 1e-9
        assert r["tv_after"] <= r["tv_before"] + 1e-9
    # The input was not modified.
    assert all(torch.equal(v, before[k]) for k, v in shuffled.state_dict().items())


def _coverage_expected(key: str, t: torch.Tensor, dim: int) -> int:
    if key == "conv1.weight" and dim == 1:
        return 0  # RGB
    if key.startswith("fc.") and dim == 0:
        return 0  # classes
    return 1


@pytest.mark.parametrize("shape,shortcut,folded", CASES)
def test_groups_cover_every_channel_once(shape, shortcut, folded):
    model = make_model(shape, shortcut, folded)
    groups = channel_groups(model)
    assert len({g.name for g in groups}) == len(groups)
    counts: dict[tuple[str, int], torch.Tensor] = {}
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for g in groups:
        assert g.size > 0
        assert sorted(g.positions) == list(g.positions)
        for m in g.members:
            assert len(m.positions) == g.size
            assert m.is_parameter == (m.key in dict(model.named_parameters()))
            c = counts.setdefault((m.key, m.dim), torch.zeros(tensors[m.key].shape[m.dim]))
            c[list(m.positions)] += 1
    for key, t in tensors.items():
        if t.dim() == 0 or key.endswith("num_batches_tracked"):
            assert not any(k == key for k, _ in counts), key  # scalars never move
            continue
        for dim in range(min(t.dim(), 2)):
            c = counts.get((key, dim), torch.zeros(t.shape[dim]))
            assert torch.all(c == _coverage_expected(key, t, dim)), (key, dim, c)
    assert ("conv1.weight", 1) not in counts
    assert ("fc.weight", 0) not in counts and ("fc.bias", 0) not in counts
    # One hidden group per block.
    n_blocks = sum(len(s) for s in model.arch.hidden)
    assert sum(g.kind == "hidden" for g in groups) == n_blocks


def test_residual_groups_option_a_lineages():
    model = make_model("resnet20", "A", True)
    res = {g.name: g for g in channel_groups(model) if g.kind == "residual"}
    assert set(res) == {"residual.stage1.stem", "residual.stage2.pad", "residual.stage3.pad"}
    stem = res["residual.stage1.stem"]
    assert stem.stage_positions == {
        1: list(range(16)),
        2: list(range(8, 24)),
        3: list(range(24, 40)),
    }
    assert res["residual.stage2.pad"].stage_positions == {
        2: list(range(8)) + list(range(24, 32)),
        3: list(range(16, 24)) + list(range(40, 48)),
    }
    assert res["residual.stage3.pad"].stage_positions == {3: list(range(16)) + list(range(48, 64))}
    # Non-default widths: pad_front = (planes - in) // 2.
    model = make_model("widths", "A", False)
    res = {g.name: g for g in channel_groups(model) if g.kind == "residual"}
    assert res["residual.stage1.stem"].stage_positions[3] == list(range(16, 24))


def test_residual_groups_option_b():
    model = make_model("resnet20", "B", False)
    res = {g.name: g for g in channel_groups(model) if g.kind == "residual"}
    assert set(res) == {"residual.stage1.stem", "residual.stage2.proj", "residual.stage3.proj"}
    keys = {(m.key, m.dim) for m in res["residual.stage1.stem"].members}
    assert ("layer2.0.shortcut.0.weight", 1) in keys and ("layer2.0.conv1.weight", 1) in keys
    keys = {(m.key, m.dim) for m in res["residual.stage2.proj"].members}
    assert {("layer2.0.shortcut.0.weight", 0), ("layer2.0.shortcut.1.running_var", 0)} <= keys
    assert ("layer2.1.conv1.weight", 1) in keys and ("layer3.0.conv1.weight", 1) in keys
    assert ("fc.weight", 1) in {(m.key, m.dim) for m in res["residual.stage3.proj"].members}


def _match_perm(old: torch.Tensor, new: torch.Tensor, dim: int) -> list[int]:
    """The permutation along ``dim`` with new == old.index_select(dim, perm) (asserts it exists)."""
    o = old.movedim(dim, 0).reshape(old.shape[dim], -1)
    n = new.movedim(dim, 0).reshape(new.shape[dim], -1)
    perm = [int((o - row).abs().sum(1).argmin()) for row in n]
    assert sorted(perm) == list(range(len(perm)))
    assert torch.equal(o[perm], n)
    return perm


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_rgb_inputs_and_class_outputs_untouched(shortcut):
    model = make_model("resnet20", shortcut, True)
    smooth, report = permute_for_smoothness(model, time_limit=TIME_LIMIT)
    assert any(g.accepted for g in report.groups)
    # The stem's out-channels move but every output filter keeps its RGB slices in order.
    perm = _match_perm(model.conv1.weight, smooth.conv1.weight, 0)
    assert perm != list(range(len(perm)))
    # Classes stay in order: fc rows only see their input columns permuted.
    assert torch.equal(model.fc.bias, smooth.fc.bias)
    perm = _match_perm(model.fc.weight, smooth.fc.weight, 1)
    assert torch.equal(model.fc.weight[:, perm], smooth.fc.weight)


def _smooth_model(shortcut: str) -> nn.Module:
    """A model whose every parameter is a smooth (monotone) function of its channel indices."""
    torch.manual_seed(0)
    model = create_model("resnet20", shortcut=shortcut, blocks_per_stage=2)
    fold_batchnorm(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 0:
                continue
            val = torch.zeros_like(p)
            for d in range(p.dim()):
                shape = [1] * p.dim()
                shape[d] = p.shape[d]
                val = val + (1.0 + d) * torch.linspace(0, 1, p.shape[d]).reshape(shape) ** 2
            p.copy_(val + 0.01 * torch.randn_like(p))
    return model.double().eval()


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_tv_strictly_decreases_on_shuffled_smooth_model(shortcut):
    model = _smooth_model(shortcut)
    groups = channel_groups(model)
    shuffled = apply_permutations(
        _smooth_model(shortcut), groups, random_orders(groups, torch.Generator().manual_seed(0))
    )
    tv_smooth, tv_shuffled = total_variation(model), total_variation(shuffled)
    assert tv_shuffled > 1.5 * tv_smooth
    smooth, report = permute_for_smoothness(shuffled, time_limit=0.05)
    assert report.tv_after < report.tv_before
    assert report.tv_after < 0.5 * tv_shuffled
    assert report.tv_after <= 1.05 * tv_smooth
    assert_same_function(shuffled, smooth)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_tv_never_increases_on_random_model(shortcut):
    model = make_model("resnet20", shortcut, True, seed=5)
    groups = channel_groups(model)
    apply_permutations(model, groups, random_orders(groups, torch.Generator().manual_seed(1)))
    smooth, report = permute_for_smoothness(model, groups=groups, time_limit=TIME_LIMIT)
    assert total_variation(smooth) <= total_variation(model) + 1e-12
    for r in report.groups:
        assert r.tv_after <= r.tv_before + 1e-9


def test_total_variation_metric():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]))
        lin.bias.copy_(torch.tensor([1.0, -1.0]))
    # weight: along dim 1: 1 + 2 + 0 + 0 = 3; along dim 0: 2 + 1 + 1 = 4; bias: 2. Two params.
    assert total_variation(lin) == pytest.approx((3 + 4 + 2) / 2)
    sd = {**lin.state_dict(), "bn.running_mean": torch.arange(5.0)}
    assert total_variation(sd) == pytest.approx((3 + 4 + 2) / 2)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 7, 19, 20, 21, 40])
def test_smoothness_order_is_permutation(n):
    feats = torch.randn(n, 5, generator=torch.Generator().manual_seed(n))
    order = smoothness_order(feats, time_limit=TIME_LIMIT)
    assert order.dtype == torch.long
    assert sorted(order.tolist()) == list(range(n))


@pytest.mark.parametrize("n", [3, 4, 12, 30, 70])
def test_smoothness_order_sorts_points_on_a_line(n):
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, generator=g).sort().values * 10 + torch.arange(n) * 0.5  # distinct
    shuffle = torch.randperm(n, generator=g)
    feats = x[shuffle, None] * torch.tensor([[1.0, -2.0, 0.5]])
    order = smoothness_order(feats, time_limit=0.05)
    got = x[shuffle][order]
    assert torch.all(got[1:] > got[:-1]) or torch.all(got[1:] < got[:-1])


def test_smoothness_order_degenerate_and_fallback(monkeypatch):
    assert smoothness_order(torch.zeros(6, 3)).tolist() == list(range(6))
    x = torch.randperm(25, generator=torch.Generator().manual_seed(0)).double()
    feats = x[:, None]

    import fast_tsp

    def boom(*args, **kwargs):
        raise RuntimeError("solver broke")

    monkeypatch.setattr(fast_tsp, "find_tour", boom)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        order = smoothness_order(feats, time_limit=TIME_LIMIT)
    assert any("greedy" in str(m.message) for m in w)
    got = x[order]
    assert torch.all(got[1:] > got[:-1]) or torch.all(got[1:] < got[:-1])


@torch.no_grad()
def test_group_features_are_the_summed_l1_objective():
    model = make_model("resnet20", "B", False)
    g = next(g for g in channel_groups(model) if g.name == "layer1.0.hidden")
    feats = group_features(model, g)
    w1 = model.layer1[0].conv1.weight.reshape(16, -1)
    w2 = model.layer1[0].conv2.weight.transpose(0, 1).reshape(16, -1)
    bn = model.layer1[0].bn1
    expected = torch.cat([w1, bn.weight[:, None], bn.bias[:, None], w2], 1)
    assert torch.equal(feats, expected.double())
    tv = sum(float((t[1:] - t[:-1]).abs().sum()) for t in (w1, bn.weight, bn.bias, w2))
    assert path_cost(feats) == pytest.approx(tv)


def test_apply_permutations_validates_orders():
    model = make_model("fewer_blocks", "A", True)
    groups = channel_groups(model)
    with pytest.raises(ValueError):
        apply_permutations(model, groups, {groups[0].name: [0, 0, 1, 2]})
    with pytest.raises(KeyError):
        apply_permutations(model, groups, {"nope": [0]})
    with pytest.raises(ValueError):
        apply_permutations(model, groups, [[0]])
    with pytest.raises(TypeError):
        channel_groups(nn.Linear(2, 2))
    assert P.__all__
