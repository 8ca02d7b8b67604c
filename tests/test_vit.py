"""The small ViT for 32x32 inputs: shapes, costs, the block-sequence protocol, the attention
output, seeded init, stochastic depth, model-file and ONNX round trips, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import metamorph
from metamorph.io import load_model, save_model
from metamorph.models import CifarViT, ViTArch, create_model, fold_batchnorm, model_family
from metamorph.models.blockseq import (
    BlockSeq,
    as_block_seq,
    block_outputs,
    can_stitch,
    check_block_seq,
    input_dim,
    run_blocks,
)
from metamorph.models.vit import SIZES
from metamorph.utils.profile import count_flops, count_params

TINY = dict(depth=3)  # vit_tiny_c10 with 3 blocks: the fast network of most tests


def _x(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _vit(name: str = "vit_tiny_c10", seed: int = 0, **kw) -> CifarViT:
    torch.manual_seed(seed)
    return create_model(name, **{**TINY, **kw})


def _expected_params(d: int, depth: int, mlp: int, classes: int, patch: int = 4) -> int:
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    stem = 3 * patch * patch * d + d + d + 65 * d  # conv, its bias, cls token, positions
    return stem + depth * block + 2 * d + d * classes + classes


def _expected_flops(d: int, depth: int, mlp: int, classes: int, n: int = 65) -> int:
    """Multiply-adds x2: patch conv, then per block qkv, q@k^T and attn@v, proj, the MLP."""
    per_block = n * (3 * d * d + d * d + 2 * d * mlp) + 2 * n * n * d
    return 2 * (64 * 48 * d + depth * per_block + d * classes)


# ----------------------------------------------------------------------------------------------
# Registered sizes: shapes, parameters, FLOPs
# ----------------------------------------------------------------------------------------------


def test_sizes_are_registered():
    assert set(SIZES) <= set(metamorph.list_models())


@pytest.mark.parametrize("name", sorted(SIZES))
def test_registered_sizes_shapes_params_and_flops(name):
    d, heads = SIZES[name]["embed_dim"], SIZES[name]["num_heads"]
    net = create_model(name, num_classes=7).eval()
    assert (net.arch.embed_dim, net.arch.num_heads, net.arch.depth) == (d, heads, 12)
    assert d // heads == 32  # every size keeps heads 32 wide (DeiT keeps 64)
    with torch.no_grad():
        out = net(_x(3))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    assert count_params(net) == _expected_params(d, 12, 4 * d, 7)
    # the attention matmuls are counted on CPU too (torch's counter only knows the CUDA kernels)
    assert count_flops(net) == _expected_flops(d, 12, 4 * d, 7)


def test_base_is_the_reference_ancestry_size():
    """The Learngene Pool reference's small-scale ancestry: ~2.4 M params, ~0.17 G MACs."""
    net = create_model("vit_base_c10")
    assert 2.3e6 < count_params(net) < 2.5e6
    assert 0.16e9 < count_flops(net) / 2 < 0.18e9


def test_kwargs_override_any_arch_field():
    net = create_model("vit_small_c10", depth=6, mlp_ratio=2.0, qkv_bias=False)
    assert len(net.blocks) == 6 and net.blocks[0].mlp.fc1.out_features == 128
    assert net.blocks[0].attn.qkv.bias is None


def test_all_parameters_get_gradients():
    net = _vit().train()
    nn.functional.cross_entropy(net(_x(4)), torch.arange(4) % 10).backward()
    for k, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
        assert p.grad.abs().sum() > 0, f"zero gradient for {k}"


# ----------------------------------------------------------------------------------------------
# The block-sequence protocol
# ----------------------------------------------------------------------------------------------


def test_protocol_invariants():
    net = _vit(depth=4)
    assert isinstance(net, BlockSeq)
    check_block_seq(net)
    assert as_block_seq(net) is net  # native: no adapter
    assert isinstance(net.blocks, nn.ModuleList) and len(net.blocks) == 4
    assert net.block_dims == [32] * 4 and net.block_stages == [0] * 4
    assert net.stitch_kind == "linear" and net.stem_dim == 32 and input_dim(net, 0) == 32
    base = _vit("vit_base_c10", depth=2)
    assert input_dim(base, 1) == 128
    # every block of one ViT may feed every block of another (one token layout throughout)
    assert all(can_stitch(net, i, base, j) for i in range(4) for j in range(2))
    # the parameters are exactly stem + blocks + head
    parts = sum(count_params(m) for m in (net.stem, *net.blocks, net.head))
    assert parts == count_params(net)


def test_forward_is_the_stem_blocks_head_chain():
    net = _vit(depth=4).eval()
    x = _x(3)
    with torch.no_grad():
        h = net.stem(x)
        assert h.shape == (3, 65, 32)  # cls + 8x8 patches
        for blk in net.blocks:
            h = blk(h)
            assert h.shape == (3, 65, 32)
        manual = net.head(h)
        out = net(x)
        torch.testing.assert_close(out, manual, rtol=0, atol=0)
        torch.testing.assert_close(run_blocks(net, x), out, rtol=0, atol=0)
        for k in range(5):  # cut anywhere and finish: the same logits
            torch.testing.assert_close(run_blocks(net, run_blocks(net, x, stop=k), start=k), out)
        outs, logits = block_outputs(net, x)
        torch.testing.assert_close(outs[-1], h)
        torch.testing.assert_close(logits, out)
        torch.testing.assert_close(net.head.fc(net.forward_features(x)), out)


def test_forward_with_attn_matches_forward_and_returns_the_attention_output():
    net = _vit(depth=3).eval()
    x = _x(2)
    with torch.no_grad():
        h = net.stem(x)
        for blk in net.blocks:
            h_out, a = blk.forward_with_attn(h)
            torch.testing.assert_close(h_out, blk(h), rtol=0, atol=0)
            torch.testing.assert_close(a, blk.attn(blk.norm1(h)), rtol=0, atol=0)
            assert a.shape == h.shape
            # the attention output is the first residual branch: h + a, then the MLP
            mid = h + a
            torch.testing.assert_close(h_out, mid + blk.mlp(blk.norm2(mid)))
            h = h_out
        torch.testing.assert_close(net.head(h), net(x))


def test_attention_is_standard_multi_head_attention():
    """scaled_dot_product_attention equals softmax(q k^T / sqrt(d_head)) v per head."""
    torch.manual_seed(0)
    net = _vit("vit_small_c10", depth=1).eval()
    attn, h = net.blocks[0].attn, torch.randn(2, 65, 64)
    with torch.no_grad():
        q, k, v = attn.qkv(h).reshape(2, 65, 3, 2, 32).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, dim=-1)
        ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 65, 64))
        torch.testing.assert_close(attn(h), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Init and stochastic depth
# ----------------------------------------------------------------------------------------------


def test_init_is_deterministic_under_a_seed():
    a, b, c = _vit(seed=3).state_dict(), _vit(seed=3).state_dict(), _vit(seed=4).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["stem.pos_embed"], c["stem.pos_embed"])
    # DeiT's init: std 0.02 for linear weights and positions, zero biases, LayerNorm identity
    net = _vit("vit_base_c10", depth=2)
    with torch.no_grad():
        assert abs(float(net.blocks[0].mlp.fc1.weight.std()) - 0.02) < 0.002
        assert abs(float(net.stem.pos_embed.std()) - 0.02) < 0.002
        assert float(net.blocks[1].attn.qkv.bias.abs().max()) == 0.0
        assert torch.equal(net.head.norm.weight, torch.ones(128))


def test_drop_path_acts_in_training_only():
    plain, dropped = _vit(depth=4), _vit(depth=4, drop_path=0.5)
    assert [blk.drop_path1.p for blk in dropped.blocks] == pytest.approx([0, 1 / 6, 1 / 3, 0.5])
    dropped.load_state_dict(plain.state_dict())  # same weights; stochastic depth has none
    x = _x(8)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), plain.eval()(x), rtol=0, atol=0)
        dropped.train()
        torch.manual_seed(0)
        first = dropped(x)
        torch.manual_seed(1)
        assert not torch.allclose(first, dropped(x))
        torch.manual_seed(0)
        torch.testing.assert_close(dropped(x), first)  # seeded: reproducible


# ----------------------------------------------------------------------------------------------
# Model file and ONNX
# ----------------------------------------------------------------------------------------------


def test_model_file_round_trip(tmp_path):
    net = _vit("vit_small_c10", depth=2, drop_path=0.1, num_classes=5).eval()
    path = save_model(net, tmp_path / "vit", meta={"note": "x"})
    doc = json.loads(path.read_text())
    assert doc["family"] == model_family(net) == "cifar_vit"
    assert doc["arch"] == net.arch.to_dict()
    assert ViTArch.from_dict(doc["arch"]) == net.arch
    back = metamorph.load(path)
    assert isinstance(back, CifarViT) and back.meta == {"note": "x"}
    with torch.no_grad():
        torch.testing.assert_close(back(_x(3)), net(_x(3)), rtol=0, atol=0)
    assert load_model(tmp_path / "vit.safetensors").arch == net.arch


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from metamorph.export.formats import check_onnx, export_onnx, read_onnx_input_spec

    net = _vit(depth=2).eval()
    path = tmp_path / "vit.onnx"
    export_onnx(net, path)  # takes [0, 1] images and normalises in the graph
    assert check_onnx(path, net, batch=5) < 1e-4
    assert read_onnx_input_spec(path)["output"] == "logits [N, 10]"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    mean = torch.tensor(net.arch.mean).view(1, 3, 1, 1)
    std = torch.tensor(net.arch.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(got, net((x - mean) / std), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Devices and errors
# ----------------------------------------------------------------------------------------------


def test_fold_batchnorm_is_a_no_op():
    net = _vit().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fold_batchnorm(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_matches_cpu():
    net = _vit("vit_base_c10", depth=2).eval()
    x = _x(4)
    with torch.no_grad():
        ref = net(x)
        got = net.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embed_dim=30), "embed_dim=30 is not divisible by num_heads=4"),
        (dict(patch_size=5), "img_size=32 is not a multiple of patch_size=5"),
        (dict(depth=0), "depth=0; it must be >= 1"),
        (dict(drop_path=1.0), r"drop_path=1.0; it must be in \[0, 1\)"),
        (dict(mean=[0.5]), "one value per input channel"),
        (dict(widht=3), r"unknown ViTArch fields \['widht'\]"),
    ],
)
def test_bad_arch_gives_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("vit_base_c10", **kwargs)


def test_wrong_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"takes 32x32 images .* got \(28, 28\)"):
        _vit()(torch.zeros(1, 3, 28, 28))


def test_latency_predictor_validation_refuses_a_vit():
    """The predictor's table holds BasicBlock shapes: a ViT name is refused, not half-built."""
    from metamorph.devices.validation import random_archs

    with pytest.raises(ValueError, match="arch=vit_tiny_c10 is not a CIFAR ResNet"):
        random_archs("vit_tiny_c10", 2)


def test_resnet_only_tasks_refuse_a_vit_with_a_clear_error(tmp_path):
    """task=slimmable and task=metamorph make CIFAR ResNets elastic: a ViT is refused by name
    (a ValueError, which the CLI prints as one line), not a TypeError traceback."""
    from conftest import TINY_DATA, compose_config

    from metamorph.cli import train

    with pytest.raises(ValueError, match="task=slimmable needs a CIFAR ResNet.*CifarViT"):
        train.run(
            compose_config(
                "train", tmp_path / "s", [*TINY_DATA, "task=slimmable", "model=vit_tiny_c10"]
            )
        )
    vit = save_model(create_model("vit_tiny_c10"), tmp_path / "vit")
    with pytest.raises(ValueError, match="is a CifarViT: task=metamorph makes CIFAR ResNets"):
        train.run(
            compose_config(
                "train", tmp_path / "m", [*TINY_DATA, "task=metamorph", f"task.base={vit}"]
            )
        )
