"""CIFAR ResNets: shapes and gradients over a grid of architectures, the JSON architecture round
trip, BatchNorm folding, and error messages."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import metamorph
from metamorph.io import load_model, save_model
from metamorph.models import (
    BasicBlock,
    CifarResNet,
    ResNetArch,
    build_from_arch,
    cifar_resnet_arch,
    create_model,
    fold_batchnorm,
    list_models,
    register_model,
)

NAMES = list_models()
RESNETS = [n for n in NAMES if n.startswith("resnet")]  # the other families test their own grid
VARIANTS = ["standard", "skipinit", "scaled_shortcut", "learnable_shortcut"]


def _x(n: int = 2, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _blocks(model: CifarResNet) -> list[BasicBlock]:
    return [b for stage in model.stages() for b in stage]


def _check_structure(model: CifarResNet, kwargs: dict, name: str = "resnet20") -> None:
    """The built model has the stage widths, blocks per stage and hidden widths asked for."""
    arch = model.arch
    n = (int(name.removeprefix("resnet")) - 2) // 6
    widths = list(kwargs.get("stage_widths", [16, 32, 64]))
    assert arch.stage_widths == widths
    counts = kwargs.get("blocks_per_stage", n)
    counts = [counts] * len(widths) if isinstance(counts, int) else list(counts)
    if "hidden" in kwargs:
        expected_hidden = kwargs["hidden"]
    else:
        hw = kwargs.get("hidden_width")
        per_stage = widths if hw is None else ([hw] * len(widths) if isinstance(hw, int) else hw)
        expected_hidden = [[per_stage[s]] * counts[s] for s in range(len(widths))]
    assert arch.hidden == expected_hidden
    assert [len(stage) for stage in model.stages()] == [len(h) for h in expected_hidden]
    assert arch.depth == 2 + 2 * sum(len(h) for h in expected_hidden)
    for s, stage in enumerate(model.stages()):
        for b, block in enumerate(stage):
            assert block.conv1.out_channels == expected_hidden[s][b]
            assert block.conv2.in_channels == expected_hidden[s][b]
            assert block.conv2.out_channels == widths[s]
    assert model.fc.in_features == widths[-1]


def _forward_backward(model: nn.Module, num_classes: int, variant: str = "standard") -> None:
    model.train()
    x = _x()
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    target = torch.arange(2) % num_classes
    nn.functional.cross_entropy(out, target).backward()
    params = dict(model.named_parameters())
    assert params
    for k, p in params.items():
        assert p.grad is not None, f"no gradient for {k}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {k}"
        # skipinit's alpha starts at 0, which zeroes the gradients inside the residual branches
        inside_branch = variant == "skipinit" and (".conv" in k or ".bn" in k)
        if not inside_branch:
            assert p.grad.abs().sum() > 0, f"zero gradient for {k}"


# ----------------------------------------------------------------------------------------------
# Registry models x hidden widths
# ----------------------------------------------------------------------------------------------


def test_registry_lists_cifar_resnets():
    assert NAMES == sorted(NAMES)
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110"} <= set(NAMES)
    assert metamorph.list_models() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_model_trains_and_round_trips(name, tmp_path):
    """Any registered architecture (ResNets, ViTs, ...): logits for the asked class count,
    finite gradients, and a model file that rebuilds it with identical logits."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = _x()
    out = model.train()(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.arange(2)).backward()
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: gradient of {k}"
    back = load_model(save_model(model, tmp_path / name))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("hidden_width", [1, 7, 16, None], ids=lambda h: f"h{h}")
@pytest.mark.parametrize("name", RESNETS)
def test_registered_model_shapes_and_grads(name, hidden_width):
    kwargs = {} if hidden_width is None else {"hidden_width": hidden_width}
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    assert isinstance(model, CifarResNet)
    _check_structure(model, kwargs, name)
    assert model.arch.depth == int(name.removeprefix("resnet"))
    if name == "resnet110":  # forward only: keeps the suite fast
        with torch.no_grad():
            assert model.eval()(_x()).shape == (2, 10)
        return
    _forward_backward(model, 10)


# ----------------------------------------------------------------------------------------------
# Architecture grid (stage widths, blocks per stage, shortcuts, block variants)
# ----------------------------------------------------------------------------------------------

ARCH_GRID = {
    "narrow_stages": dict(stage_widths=[8, 16, 32]),
    "equal_stages_A": dict(stage_widths=[16, 16, 16]),
    "odd_widths_A": dict(stage_widths=[5, 9, 14]),
    "two_stages": dict(stage_widths=[4, 8]),
    "four_stages": dict(stage_widths=[4, 8, 16, 32]),
    "one_block": dict(blocks_per_stage=1),
    "uneven_blocks": dict(blocks_per_stage=[1, 2, 3]),
    "per_stage_hidden": dict(hidden_width=[3, 7, 11], blocks_per_stage=2),
    "explicit_hidden": dict(hidden=[[5, 16, 9], [32, 1], [64, 3, 50, 2]]),
    "shrinking_B": dict(stage_widths=[32, 16, 8], shortcut="B", blocks_per_stage=1),
    "cifar100": dict(num_classes=100, blocks_per_stage=1),
}
for _sc in ("A", "B"):
    for _v in VARIANTS:
        ARCH_GRID[f"{_sc}_{_v}"] = dict(shortcut=_sc, block_variant=_v, blocks_per_stage=2)


@pytest.mark.parametrize("case", list(ARCH_GRID))
def test_arch_grid_shapes_and_grads(case):
    kwargs = ARCH_GRID[case]
    torch.manual_seed(1)
    model = create_model("resnet20", **kwargs)
    _check_structure(model, kwargs)
    arch = model.arch
    assert arch.shortcut == kwargs.get("shortcut", "A")
    assert arch.block_variant == kwargs.get("block_variant", "standard")
    for block in _blocks(model):
        needs_projection = (
            block.conv1.stride != (1, 1) or block.conv1.in_channels != block.conv2.out_channels
        )
        if not needs_projection:
            assert isinstance(block.shortcut, nn.Identity)
        elif arch.shortcut == "B":
            assert isinstance(block.shortcut, nn.Sequential)
        else:
            assert not list(block.shortcut.parameters())  # option A is parameter-free
        assert hasattr(block, "alpha") == (arch.block_variant == "skipinit")
        assert hasattr(block, "shortcut_scale") == (arch.block_variant == "learnable_shortcut")
    _forward_backward(model, arch.num_classes, arch.block_variant)


def test_shortcut_a_pads_zero_channels():
    """Option A: subsampled input, zero channels split front/back, exactly."""
    model = create_model("resnet20", stage_widths=[4, 9], blocks_per_stage=1).eval()
    sc = model.layer2[0].shortcut
    x = _x(1, size=8)[:, :1].repeat(1, 4, 1, 1) + torch.arange(4.0).view(1, 4, 1, 1)
    y = sc(x)
    assert y.shape == (1, 9, 4, 4)
    torch.testing.assert_close(y[:, 2:6], x[:, :, ::2, ::2])  # 5 extra: 2 in front, 3 behind
    assert y[:, :2].abs().sum() == 0 and y[:, 6:].abs().sum() == 0


def test_block_variants_differ_as_specified():
    """The variants compute different functions of the same weights."""
    torch.manual_seed(0)
    base = create_model("resnet20", blocks_per_stage=1)
    x = _x()
    outs = {}
    for v in VARIANTS:
        m = create_model("resnet20", blocks_per_stage=1, block_variant=v)
        m.load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            outs[v] = m.eval()(x)
    # learnable_shortcut starts at s=1, i.e. equals scaled_shortcut
    torch.testing.assert_close(outs["learnable_shortcut"], outs["scaled_shortcut"])
    assert not torch.allclose(outs["standard"], outs["scaled_shortcut"])
    assert not torch.allclose(outs["standard"], outs["skipinit"])


# ----------------------------------------------------------------------------------------------
# ResNetArch JSON round trip
# ----------------------------------------------------------------------------------------------

ROUNDTRIP = {
    "resnet20": ("resnet20", {}),
    "resnet32_h7_B": ("resnet32", dict(hidden_width=7, shortcut="B")),
    "explicit_hidden_skipinit": (
        "resnet20",
        dict(hidden=[[5, 16, 9], [32, 1], [64]], block_variant="skipinit"),
    ),
    "two_stages_learnable": (
        "resnet20",
        dict(stage_widths=[6, 12], block_variant="learnable_shortcut"),
    ),
    "custom_norm": ("resnet20", dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), num_classes=7)),
}


@pytest.mark.parametrize("case", list(ROUNDTRIP))
def test_arch_json_roundtrip_rebuilds_identical_model(case, randomize_bn):
    name, kwargs = ROUNDTRIP[case]
    torch.manual_seed(2)
    model = randomize_bn(create_model(name, **kwargs)).eval()
    d = json.loads(json.dumps(model.arch.to_dict()))
    arch2 = ResNetArch.from_dict(d)
    assert arch2 == model.arch
    assert arch2.to_dict() == model.arch.to_dict()
    for rebuilt in (CifarResNet(arch2), build_from_arch("cifar_resnet", d)):
        sd1, sd2 = model.state_dict(), rebuilt.state_dict()
        assert list(sd1) == list(sd2)
        assert all(sd1[k].shape == sd2[k].shape for k in sd1)
        rebuilt.load_state_dict(sd1)  # strict
        rebuilt.eval()
        x = _x()
        with torch.no_grad():
            assert torch.equal(model(x), rebuilt(x))


def test_arch_dict_is_plain_json():
    d = cifar_resnet_arch(depth=20, hidden_width=3).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {
        "stage_widths", "hidden", "num_classes", "in_channels", "shortcut", "bn", "block_variant",
        "block_variants", "bn_blocks", "mean", "std",
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# BatchNorm folding
# ----------------------------------------------------------------------------------------------

FOLD_CASES = {
    "resnet20": ("resnet20", {}),
    "resnet56": ("resnet56", {}),
    "resnet20_B": ("resnet20", dict(shortcut="B")),
    "h1": ("resnet20", dict(hidden_width=1)),
    "h7_four_stages": (
        "resnet20",
        dict(hidden_width=7, stage_widths=[4, 8, 16, 32], blocks_per_stage=1),
    ),
    "shrinking_B": ("resnet32", dict(stage_widths=[32, 16, 8], shortcut="B")),
    "skipinit": ("resnet20", dict(block_variant="skipinit")),
    "scaled_shortcut": ("resnet20", dict(block_variant="scaled_shortcut", shortcut="B")),
    "learnable_shortcut": ("resnet20", dict(block_variant="learnable_shortcut")),
}


@pytest.mark.parametrize("case", list(FOLD_CASES))
def test_fold_batchnorm_preserves_logits(case, tmp_path, randomize_bn):
    name, kwargs = FOLD_CASES[case]
    torch.manual_seed(3)
    model = randomize_bn(create_model(name, **kwargs), seed=4).eval()
    with torch.no_grad():  # non-default block scalars so they must survive folding
        for block in _blocks(model):
            if hasattr(block, "alpha"):
                block.alpha.fill_(0.7)
            if hasattr(block, "shortcut_scale"):
                block.shortcut_scale.fill_(1.3)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == len(model.conv_bn_pairs())
    x = _x(4, seed=5)
    with torch.no_grad():
        ref = model(x)
        folded = fold_batchnorm(copy.deepcopy(model))
        out = folded(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.arch.bn is False and model.arch.bn is True
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is not None for c in convs)
    assert not any(k.endswith(("running_mean", "running_var")) for k in folded.state_dict())
    # the folded model, rebuilt from its own architecture file, computes the same logits
    save_model(folded, tmp_path / "folded")
    doc = json.loads((tmp_path / "folded.json").read_text())
    assert doc["arch"]["bn"] is False
    loaded = load_model(tmp_path / "folded.json")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_fold_batchnorm_is_idempotent_and_checks_type(randomize_bn):
    model = randomize_bn(create_model("resnet20", blocks_per_stage=1)).eval()
    folded = fold_batchnorm(model)
    assert folded is model
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    fold_batchnorm(folded)  # nothing left to fold: weights unchanged
    after = folded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(TypeError, match="conv_bn_pairs"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)))


def test_unfolded_arch_builds_bias_free_convs():
    model = create_model("resnet20")
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    nobn = create_model("resnet20", bn=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in nobn.modules())
    assert all(m.bias is not None for m in nobn.modules() if isinstance(m, nn.Conv2d))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_unknown_model_name_lists_registered():
    with pytest.raises(ValueError, match="unknown model 'resnet21'") as e:
        create_model("resnet21")
    for name in NAMES:
        assert name in str(e.value)


@pytest.mark.parametrize("depth", [0, 2, 7, 19, 21, 33, 111])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match=r"6n\+2.*got " + str(depth)):
        cifar_resnet_arch(depth=depth)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(hidden_width=0),
        dict(hidden_width=[16, 0, 64]),
        dict(hidden=[[16, 0, 16], [32] * 3, [64] * 3]),
    ],
    ids=["all", "per_stage", "explicit"],
)
def test_hidden_width_zero(kwargs):
    with pytest.raises(ValueError, match=r"hidden width of layer\d\.\d is 0; it must be >= 1"):
        create_model("resnet20", **kwargs)


def test_shortcut_a_cannot_shrink_channels():
    with pytest.raises(
        ValueError, match=r"option-A shortcut cannot shrink channels \(32 -> 16\).*shortcut B"
    ):
        create_model("resnet20", stage_widths=[32, 16, 8])
    create_model("resnet20", stage_widths=[32, 16, 8], shortcut="B")  # fine with projections


def test_unknown_arch_field():
    d = cifar_resnet_arch(depth=20).to_dict()
    d["depth"] = 20
    d["widht"] = 3
    with pytest.raises(ValueError, match=r"unknown ResNetArch fields \['depth', 'widht'\]"):
        ResNetArch.from_dict(d)
    with pytest.raises(ValueError, match="unknown ResNetArch fields"):
        build_from_arch("cifar_resnet", d)
    with pytest.raises(ValueError, match="unknown model family 'vit'"):
        build_from_arch("vit", cifar_resnet_arch(depth=20).to_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shortcut="C"), "unknown shortcut 'C'"),
        (dict(block_variant="fixup"), "unknown block_variant 'fixup'"),
        (dict(stage_widths=[16, 0, 64], hidden_width=4), "stage widths must be >= 1"),
        (dict(blocks_per_stage=0), "stage 1 has no blocks"),
        (dict(blocks_per_stage=[1, 2]), "blocks_per_stage has 2 entries but there are 3 stages"),
        (
            dict(blocks_per_stage=[1, 2, 3, 4]),
            "blocks_per_stage has 4 entries but there are 3 stages",
        ),
        (dict(hidden_width=[4, 4]), "hidden_width has 2 entries but there are 3 stages"),
        (dict(hidden=[[16], [32]]), "stage_widths has 3 stages but hidden has 2"),
        (dict(mean=(0.5, 0.5)), "one value per input channel"),
    ],
)
def test_invalid_arch_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("resnet20", **kwargs)


def test_register_model_rejects_duplicates():
    def resnet20(**kw):  # same name as a registered model
        raise AssertionError("must not be called")

    with pytest.raises(ValueError, match="'resnet20' is already registered"):
        register_model(resnet20)
    assert list_models() == NAMES
