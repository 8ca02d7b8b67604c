"""The metamorphic core: INR coordinates and heads, MetaResNet emission/forward/materialize,
shape validation, the training step and the shape sampler (CPU, tiny INRs)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metamorph import create_model
from metamorph.hypernet.inr import INRConfig, TensorSlot, WeightINR, fourier_features
from metamorph.hypernet.metanet import BLOCK_TENSORS, MetaResNet, MetaSpec
from metamorph.hypernet.sampling import SamplingConfig, ShapeSampler, width_range
from metamorph.models import CifarResNet, fold_batchnorm
from metamorph.tasks.metamorph import LossConfig, MetamorphConfig, MetamorphModule

torch.set_num_threads(1)

TINY = INRConfig(hidden=16, layers=2, freqs=4)
META = "layer3.2"


def folded_resnet20(seed: int = 0, **kw) -> CifarResNet:
    """A resnet20 with non-trivial BN statistics, folded (no BatchNorm left)."""
    torch.manual_seed(seed)
    model = create_model("resnet20", **kw)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.2)
    return fold_batchnorm(model.eval())


def meta_net(blocks=(META,), seed: int = 0, inr: INRConfig = TINY, **spec_kw) -> MetaResNet:
    base = folded_resnet20(seed)
    torch.manual_seed(seed + 1)
    return MetaResNet(base, MetaSpec(blocks=list(blocks), **spec_kw), inr)


def with_width(net: MetaResNet, block: str, w: int) -> list[list[int]]:
    s, b = (int(x) for x in block.removeprefix("layer").split("."))
    h = net.full_shape
    h[s - 1][b] = w
    return h


def declared_shapes(net: MetaResNet, hidden) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the plain network the architecture describes at ``hidden``."""
    with torch.device("meta"):
        plain = CifarResNet(net.arch_for(hidden))
    return {k: tuple(v.shape) for k, v in plain.state_dict().items()}


def random_shape(net: MetaResNet, g: torch.Generator) -> list[list[int]]:
    """Each stage keeps 1..n blocks; every metamorphic block gets a width in 1..max_width."""
    out = []
    for s, stage in enumerate(net.base_arch.hidden):
        keep = int(torch.randint(1, len(stage) + 1, (), generator=g))
        row = []
        for b in range(keep):
            name = f"layer{s + 1}.{b}"
            if name in net.meta_blocks:
                row.append(int(torch.randint(1, net.max_width(name) + 1, (), generator=g)))
            else:
                row.append(stage[b])
        out.append(row)
    return out


@pytest.fixture(scope="module")
def net3() -> MetaResNet:
    return meta_net()


@pytest.fixture(scope="module")
def net_all() -> MetaResNet:
    return meta_net(blocks=["all"])


# ----------------------------------------------------------------------------------------------
# Emission shapes and the forward pass
# ----------------------------------------------------------------------------------------------


def test_emitted_shapes_every_width_of_one_block(net3):
    assert net3.meta_blocks == [META]
    assert net3.max_width(META) == 128
    for w in range(1, 97):
        hidden = with_width(net3, META, w)
        em = net3.emit(hidden)
        assert set(em) == {f"{META}.{t}" for t in BLOCK_TENSORS}
        assert tuple(em[f"{META}.conv1.weight"].shape) == (w, 64, 3, 3)
        assert tuple(em[f"{META}.conv1.bias"].shape) == (w,)
        assert tuple(em[f"{META}.conv2.weight"].shape) == (64, w, 3, 3)
        assert tuple(em[f"{META}.conv2.bias"].shape) == (64,)
        decl = declared_shapes(net3, hidden)
        assert all(tuple(v.shape) == decl[k] for k, v in em.items())
        assert all(torch.isfinite(v).all() for v in em.values())


@pytest.mark.parametrize("w", [1, 5, 32, 64, 96, 128])
def test_forward_runs_at_widths(net3, w):
    hidden = with_width(net3, META, w)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(w))
    with torch.no_grad():
        y = net3(x, hidden)
        ref = net3.materialize(hidden)(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)


def test_full_scope_random_shapes_materialize(net_all):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    depths = set()
    for _ in range(5):
        hidden = random_shape(net_all, g)
        depths.add(tuple(len(s) for s in hidden))
        em = net_all.emit(hidden)
        decl = declared_shapes(net_all, hidden)
        present = [f"layer{s + 1}.{b}" for s, st in enumerate(hidden) for b in range(len(st))]
        assert set(em) == {f"{blk}.{t}" for blk in present for t in BLOCK_TENSORS}
        for k, v in em.items():
            assert tuple(v.shape) == decl[k], k
        plain = net_all.materialize(hidden)
        assert type(plain) is CifarResNet
        assert plain.arch.hidden == hidden and plain.arch.bn is False
        assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
        assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == decl
        assert all(not p.is_meta for p in plain.parameters())
        # Non-metamorphic tensors are the frozen base ones, metamorphic ones the emitted ones.
        assert torch.equal(plain.conv1.weight, net_all.base_tensor("conv1.weight"))
        assert torch.equal(plain.fc.weight, net_all.base_tensor("fc.weight"))
        for k, v in em.items():
            assert torch.equal(plain.state_dict()[k], v)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), net_all(x, hidden, em), atol=1e-5, rtol=0)
    assert any(d != (3, 3, 3) for d in depths), "no reduced-depth shape was drawn"


def test_materialize_with_noise_and_k_matches_forward(net_all):
    hidden = [[8, 3], [32, 20, 1], [64]]
    x = torch.randn(2, 3, 16, 16)
    plain = net_all.materialize(hidden, k=3, noise=0.5, seed=4)
    em = net_all.emit(hidden, noise=0.5, generator=torch.Generator().manual_seed(4), k=3)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net_all(x, hidden, em), atol=1e-5, rtol=0)
        assert not torch.allclose(plain(x), net_all.materialize(hidden)(x), atol=1e-6)


def test_forward_gradients_reach_the_inr(net3):
    hidden = with_width(net3, META, 40)
    net3.inr.zero_grad()
    net3(torch.randn(2, 3, 8, 8), hidden).square().sum().backward()
    grads = [p.grad for p in net3.inr.parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    net3.inr.zero_grad()
    assert all(not b.requires_grad for b in net3.buffers())


# ----------------------------------------------------------------------------------------------
# Determinism, noise, K-sample averaging, quirk mode
# ----------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("quirk", [False, True])
def test_same_seed_bit_identical_different_seed_differs(net_all, quirk):
    hidden = [[16, 9, 16], [30, 32], [64, 50, 17]]
    kw = dict(noise=1.0, quirk=quirk, k=3)
    with torch.no_grad():
        a = net_all.emit(hidden, generator=_gen(5), **kw)
        b = net_all.emit(hidden, generator=_gen(5), **kw)
        c = net_all.emit(hidden, generator=_gen(6), **kw)
        clean = net_all.emit(hidden)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)
    assert all(not torch.equal(a[k], clean[k]) for k in a)


def test_k_average_without_noise_equals_single_emission(net_all):
    hidden = [[16, 9, 16], [30, 32], [64, 50]]
    with torch.no_grad():
        one = net_all.emit(hidden)
        for k in (2, 3, 5):
            avg = net_all.emit(hidden, noise=0.0, generator=_gen(1), k=k)
            for name in one:
                torch.testing.assert_close(avg[name], one[name], atol=1e-7, rtol=1e-6)
        two = net_all.emit(hidden, noise=0.0, k=2)
        assert all(torch.equal(two[n], one[n]) for n in one)  # (x + x) / 2 is exact


def test_k_average_with_noise_is_the_mean_of_the_samples(net3):
    hidden = with_width(net3, META, 24)
    slot = net3.slot_of[f"{META}.conv1.weight"]
    shape = net3.tensor_shape(slot.name, hidden)
    with torch.no_grad():
        avg = net3.emit(hidden, noise=0.7, generator=_gen(2), k=3)
        g = _gen(2)
        samples = [net3.inr.emit_tensor(slot, shape)]
        samples += [net3.inr.emit_tensor(slot, shape, 0.7, g) for _ in range(2)]
    torch.testing.assert_close(avg[slot.name], sum(samples) / 3, atol=1e-7, rtol=1e-6)


def test_quirk_without_noise_equals_normal(net_all):
    hidden = [[16, 9, 16], [30, 32], [64, 50, 17]]
    with torch.no_grad():
        a = net_all.emit(hidden, noise=0.0, generator=_gen(3), quirk=True)
        b = net_all.emit(hidden)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _quirk_reference(inr: WeightINR, slot: TensorSlot, shape, noise: float, seed: int):
    """Head chosen by trunc(i + u); output divided by the noisy fan-in (the official code)."""
    rows, cols = shape[0], (shape[1] if slot.kind == "weight" else 1)
    raw = inr.raw_grid(slot, rows, cols, torch.device("cpu"))
    u = torch.rand(raw.shape, generator=_gen(seed)) - 0.5
    noisy = raw + noise * u
    feats = fourier_features(inr.normalize(noisy), inr.cfg.freqs)
    by_index = {s.index: s for s in inr.slots.values()}
    out = torch.zeros(rows * cols, inr.cfg.kernel_out)
    routed = torch.zeros(rows * cols, dtype=torch.bool)
    for q in range(rows * cols):
        hid = max(0, math.trunc(float(noisy[q, 0])))
        src = by_index.get(hid, slot)
        routed[q] = src.name != slot.name
        y = inr.head(src.name)(feats[q : q + 1])[0]
        out[q, : y.numel()] = y
    out = out / noisy[:, 5:6]
    if slot.kind == "bias":
        return out[:, 0].reshape(shape), routed
    kk = shape[2] * shape[3]
    start = inr.cfg.kernel_out // 2 - kk // 2
    return out[:, start : start + kk].reshape(shape), routed


def test_quirk_routes_noisy_queries_to_previous_head(net3):
    """conv1.bias (i > 0) of layer3.2: queries with u_i < 0 go to the conv1.weight head."""
    hidden = with_width(net3, META, 48)
    slot = net3.slot_of[f"{META}.conv1.bias"]
    prev = net3.slot_of[f"{META}.conv1.weight"]
    assert slot.index == prev.index + 1 > 0
    shape = net3.tensor_shape(slot.name, hidden)
    with torch.no_grad():
        quirk = net3.inr.emit_tensor(slot, shape, 1.0, _gen(7), quirk=True)
        normal = net3.inr.emit_tensor(slot, shape, 1.0, _gen(7), quirk=False)
        ref, routed = _quirk_reference(net3.inr, slot, shape, 1.0, 7)
    assert 0 < routed.sum() < routed.numel()  # about half of them
    torch.testing.assert_close(quirk, ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(quirk, normal)
    # Queries that stay on their own head differ from the normal emission only by the fan-in.
    u = torch.rand(shape[0], 6, generator=_gen(7)) - 0.5
    own = ~routed
    torch.testing.assert_close(quirk[own] * (1 + u[own, 5]), normal[own], atol=1e-6, rtol=1e-5)
    # Through MetaResNet.emit as well.
    with torch.no_grad():
        a = net3.emit(hidden, noise=1.0, generator=_gen(7), quirk=True)
        b = net3.emit(hidden, noise=1.0, generator=_gen(7))
    assert not torch.allclose(a[slot.name], b[slot.name])


def test_quirk_weight_tensor_and_first_tensor(net_all):
    with torch.no_grad():
        for name, w in [("layer2.1.conv2.weight", 5), ("layer1.0.conv1.weight", 3)]:
            slot = net_all.slot_of[name]
            hidden = with_width(net_all, name.rsplit(".", 2)[0], w)
            shape = net_all.tensor_shape(name, hidden)
            quirk = net_all.inr.emit_tensor(slot, shape, 0.8, _gen(11), quirk=True)
            ref, routed = _quirk_reference(net_all.inr, slot, shape, 0.8, 11)
            torch.testing.assert_close(quirk, ref, atol=1e-6, rtol=1e-5)
            if slot.index == 0:
                assert not routed.any()  # trunc(0 + u) = 0: tensor 0 has no previous head
            else:
                assert routed.any() and not routed.all()


# ----------------------------------------------------------------------------------------------
# Coordinates and Fourier features
# ----------------------------------------------------------------------------------------------


def test_normalize_matches_hand_computed_coordinates(net3):
    inr = net3.inr
    slot = net3.slot_of[f"{META}.conv2.weight"]
    L, N = 36, 64.0  # 9 blocks x 4 tensors; widest stage
    assert (slot.index, inr.num_slots, inr.norm) == (4 * 8 + 2, L, N)
    R, C = 5, 7
    raw = inr.raw_grid(slot, R, C, torch.device("cpu"))
    assert raw.shape == (R * C, 6)
    coords = inr.normalize(raw)
    expected = torch.tensor(
        [[slot.index / L, r / R, c / C, L / N, R / N, C / N] for r in range(R) for c in range(C)],
        dtype=torch.float32,
    )
    torch.testing.assert_close(coords, expected, atol=1e-7, rtol=0)
    assert coords.min() >= 0 and coords[:, :3].max() < 1


def test_coordinates_stable_under_scope_growth_and_depth(net3, net_all):
    cpu = torch.device("cpu")
    for t in BLOCK_TENSORS:
        a, b = net3.slot_of[f"{META}.{t}"], net_all.slot_of[f"{META}.{t}"]
        assert a == b
        assert torch.equal(
            net3.inr.normalize(net3.inr.raw_grid(a, 33, 64, cpu)),
            net_all.inr.normalize(net_all.inr.raw_grid(b, 33, 64, cpu)),
        )
    assert (net3.inr.num_slots, net3.inr.norm) == (net_all.inr.num_slots, net_all.inr.norm)
    # Growing the scope leaves the emission of an existing block untouched.
    net = meta_net()
    hidden = with_width(net, META, 40)
    before = net.emit(hidden)
    torch.manual_seed(123)
    net.add_block("layer1.0")
    net.add_block("layer3.1")
    assert net.meta_blocks == [META, "layer1.0", "layer3.1"]
    after = net.emit(hidden)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(after) - set(before) == {
        f"{b}.{t}" for b in ("layer1.0", "layer3.1") for t in BLOCK_TENSORS
    }
    # Changing the depth leaves the emission of the blocks that remain untouched.
    full = net_all.emit([[5, 16, 16], [32, 7, 32], [64, 64, 9]])
    short = net_all.emit([[5], [32, 7], [64]])
    assert set(short) < set(full)
    assert all(torch.equal(v, full[k]) for k, v in short.items())


def test_fourier_features_dimension_and_values():
    x = torch.tensor([[0.0, 0.25, 1.0], [0.5, -0.3, 0.125]])
    d = x.shape[1]
    for F in (0, 1, 3, 6):
        f = fourier_features(x, F)
        assert f.shape == (2, d * (1 + 2 * F))
        assert torch.equal(f[:, :d], x)
        for j in range(d):
            for k in range(F):
                arg = (2.0**k) * math.pi * x[:, j]
                torch.testing.assert_close(f[:, d + j * F + k], torch.sin(arg))
                torch.testing.assert_close(f[:, d + d * F + j * F + k], torch.cos(arg))
    assert fourier_features(torch.zeros(4, 5, 6), 2).shape == (4, 5, 30)
    inr = WeightINR(INRConfig(hidden=8, layers=1, freqs=5), num_slots=4, norm=8.0)
    assert inr.in_dim == 6 * 11


def test_init_from_copies_heads_and_emission():
    net = meta_net()
    with torch.no_grad():  # make the source head non-trivial
        for p in net.inr.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.add_block("layer3.1", init_from=META)
    for t in BLOCK_TENSORS:
        src, new = net.inr.head(f"{META}.{t}"), net.inr.head(f"layer3.1.{t}")
        assert src is not new
        for (n, a), (_, b) in zip(src.named_parameters(), new.named_parameters()):
            if n != "inp.bias":
                assert torch.equal(a, b), n
    for w in (64, 20, 100):
        hidden = net.full_shape
        hidden[2][1] = hidden[2][2] = w
        em = net.emit(hidden)
        for t in BLOCK_TENSORS:
            torch.testing.assert_close(em[f"layer3.1.{t}"], em[f"{META}.{t}"], atol=1e-6, rtol=1e-4)
    # The copy is independent: training it leaves the source alone.
    with torch.no_grad():
        net.inr.head("layer3.1.conv1.weight").out.bias.add_(1.0)
    em = net.emit(net.full_shape)
    assert not torch.allclose(em["layer3.1.conv1.weight"], em[f"{META}.conv1.weight"], atol=1e-3)
    # Without init_from the heads are fresh.
    net.add_block("layer3.0")
    fresh, src = net.inr.head("layer3.0.conv2.weight"), net.inr.head(f"{META}.conv2.weight")
    assert not torch.equal(fresh.out.weight, src.out.weight)


# ----------------------------------------------------------------------------------------------
# Shape validation
# ----------------------------------------------------------------------------------------------


def test_check_shape_errors(net3):
    net3.check_shape(net3.full_shape)
    net3.check_shape(with_width(net3, META, 1))
    net3.check_shape(with_width(net3, META, 128))
    with pytest.raises(ValueError, match=r"width 0 of layer3\.2 .*1\.\.128"):
        net3.emit(with_width(net3, META, 0))
    with pytest.raises(ValueError, match=r"1\.\.128"):
        net3.check_shape(with_width(net3, META, 129))
    with pytest.raises(ValueError, match="stage 2 keeps 0 blocks; allowed 1..3"):
        net3.check_shape([[16, 16, 16], [], [64, 64, 64]])
    with pytest.raises(ValueError, match="stage 1 keeps 4 blocks; allowed 1..3"):
        net3.check_shape([[16] * 4, [32] * 3, [64] * 3])
    with pytest.raises(ValueError, match=r"layer2\.1 is not metamorphic.*32 \(got 30\)"):
        net3.check_shape([[16] * 3, [32, 30, 32], [64] * 3])
    with pytest.raises(ValueError, match="2 stages"):
        net3.check_shape([[16] * 3, [32] * 3])
    with pytest.raises(ValueError):
        net3(torch.randn(1, 3, 8, 8), with_width(net3, META, 200))


def test_spec_errors():
    base = folded_resnet20()
    with pytest.raises(ValueError, match="unknown metamorphic blocks"):
        MetaResNet(base, MetaSpec(blocks=["layer4.0"]), TINY)
    with pytest.raises(ValueError, match="BatchNorm"):
        MetaResNet(create_model("resnet20"), MetaSpec(), TINY)


def test_shape_for_gamma(net3, net_all):
    assert net3.shape_for_gamma(0.0) == net3.full_shape
    assert net3.shape_for_gamma(0.5) == [[16] * 3, [32] * 3, [64, 64, 32]]
    assert net_all.shape_for_gamma(0.25) == [[12] * 3, [24] * 3, [48] * 3]
    assert net_all.shape_for_gamma(0.999) == [[1] * 3, [1] * 3, [1] * 3]
    assert net_all.shape_for_gamma(0.5, depth=[1, 2, 3]) == [[8], [16, 16], [32, 32, 32]]
    assert net_all.shape_for_gamma(0.0, depth=1) == [[16], [32], [64]]
    assert net_all.gamma_of(net_all.shape_for_gamma(0.25)) == pytest.approx(0.25)
    for g in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            net3.shape_for_gamma(g)


# ----------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------


def tiny_module(**cfg_kw) -> MetamorphModule:
    base = folded_resnet20(stage_widths=[4, 8, 8])
    cfg = MetamorphConfig(spec=MetaSpec(blocks=["layer3.1", "layer3.2"]), inr=TINY, **cfg_kw)
    torch.manual_seed(0)
    return MetamorphModule(MetaResNet(base, cfg.spec, cfg.inr), cfg)


def run_steps(module: MetamorphModule, x, y, n: int, lr: float = 1e-2):
    logged: list[dict] = []
    module.log = lambda name, value, **kw: logged[-1].__setitem__(
        name, float(torch.as_tensor(value).detach())
    )
    opt = torch.optim.Adam(module.trainable_parameters(), lr=lr)
    losses = []
    for i in range(n):
        logged.append({})
        loss = module.training_step((x, y), i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.on_train_batch_end(loss, (x, y), i)
        losses.append(float(loss.detach()))
    return losses, logged


def test_training_steps_lower_the_loss():
    module = tiny_module()
    g = _gen(0)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    base_before = {k: v.clone() for k, v in module.net.named_buffers()}
    ema_before = [p.clone() for p in module.ema.shadow.parameters()]
    assert module.global_step == 0 and module.sampler.is_full_step(0)
    losses, logged = run_steps(module, x, y, 12)
    assert losses[-1] < 0.8 * losses[0], losses
    assert {"train/ce", "train/recon", "train/reg", "train/loss", "train/gamma"} <= set(logged[0])
    assert logged[0]["train/gamma"] == 0.0
    # Only the INR trains; the prepared base stays frozen.
    assert all(torch.equal(v, base_before[k]) for k, v in module.net.named_buffers())
    # The EMA moved towards the live weights but lags behind them.
    ema_after = list(module.ema.shadow.parameters())
    live = list(module.net.inr.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(ema_after, ema_before))
    assert any(not torch.equal(a, b) for a, b in zip(ema_after, live))
    # emit_eval swaps the EMA weights in and restores the live ones afterwards.
    live_copy = [p.clone() for p in live]
    ema_em = module.emit_eval(module.net.full_shape, k=1)
    assert all(torch.equal(a, b) for a, b in zip(live, live_copy))
    live_em = module.net.emit(module.net.full_shape)
    assert not torch.equal(ema_em[f"{META}.conv1.weight"], live_em[f"{META}.conv1.weight"])


def test_training_step_at_a_reduced_shape_has_no_recon():
    module = tiny_module(sampling=SamplingConfig(mode="uniform", full_width_every=0))
    hidden = module.sampler.sample(0)
    assert hidden != module.net.full_shape
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    _, logged = run_steps(module, x, y, 1)
    assert "train/recon" not in logged[0] and "train/ce" in logged[0]
    assert module.net.gamma_of(hidden) > 0
    assert logged[0]["train/gamma"] == pytest.approx(module.net.gamma_of(hidden))


def test_recon_warmup_steps_skip_the_classifier_loss():
    module = tiny_module(recon_warmup_steps=5)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    losses, logged = run_steps(module, x, y, 3)
    assert "train/ce" not in logged[0] and "train/recon" in logged[0]
    assert losses[-1] < losses[0]


def test_recon_warmup_emits_only_the_full_shape(monkeypatch):
    """During the warm-up only the full-width emission is fitted: one emission per step."""
    module = tiny_module(
        recon_warmup_steps=5, sampling=SamplingConfig(mode="uniform", full_width_every=0)
    )
    shapes = []
    emit_many = module.net.emit_many  # the training step emits all its shapes in one pass
    monkeypatch.setattr(
        module.net, "emit_many", lambda hs, **kw: shapes.extend(hs) or emit_many(hs, **kw)
    )
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    _, logged = run_steps(module, x, y, 2)
    assert shapes == [module.net.full_shape] * 2
    assert logged[0]["train/gamma"] == 0.0


def test_relative_recon_weighs_every_tensor_alike():
    from metamorph.tasks.metamorph import recon_loss

    t_small, t_large = torch.full((4, 4), 0.01), torch.full((4,), 1.0)
    # the same 10% relative error costs the same, whatever the tensor's scale
    a = recon_loss(1.1 * t_small, t_small, "relative")
    b = recon_loss(1.1 * t_large, t_large, "relative")
    assert a.item() == pytest.approx(0.01, rel=1e-4) and b.item() == pytest.approx(0.01, rel=1e-4)
    assert recon_loss(1.1 * t_small, t_small, "mse") < 1e-4 * recon_loss(
        1.1 * t_large, t_large, "mse"
    )
    with pytest.raises(ValueError, match="recon_type"):
        recon_loss(t_small, t_small, "l1")
    with pytest.raises(ValueError, match="task.loss.recon_type='l1'"):
        tiny_module(loss=LossConfig(recon_type="l1"))


def test_emit_eval_k1_is_the_noise_free_emission():
    """K = 1 is NeuMeta's sample 0 (no coordinate noise); K > 1 adds noisy samples."""
    module = tiny_module(coord_noise=1.0, ema_decay=0.0)
    hidden = module.net.shape_for_gamma(0.25)
    clean = module.net.emit(hidden, noise=0.0)
    for seed in (0, 1):
        e = module.emit_eval(hidden, k=1, seed=seed)
        assert all(torch.equal(e[n], clean[n]) for n in clean)
    a, b = module.emit_eval(hidden, k=3, seed=0), module.emit_eval(hidden, k=3, seed=1)
    assert any(not torch.equal(a[n], clean[n]) for n in clean)
    assert any(not torch.equal(a[n], b[n]) for n in clean)


def test_post_warmup_optimizer_reset_and_lr_ramp(tmp_path):
    """At the first classifier step Adam's state is cleared and the lr ramps up from 0."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from metamorph.config.schema import OptimConfig, SchedulerConfig

    module = tiny_module(
        recon_warmup_steps=3,
        reset_optimizer_after_warmup=True,
        lr_ramp_steps=4,
        optim=OptimConfig(name="adamw", lr=1e-2, weight_decay=0.0),
        scheduler=SchedulerConfig(name="none"),
    )
    assert [module.lr_factor(s) for s in range(8)] == [1, 1, 1, 0.25, 0.5, 0.75, 1, 1]
    module.cfg.post_warmup_lr_factor = 0.1
    assert [module.lr_factor(s) for s in (2, 3, 6)] == pytest.approx([1, 0.025, 0.1])
    module.cfg.post_warmup_lr_factor = 1.0
    seen: list[tuple[int, int, float]] = []

    class Probe(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps = [float(st["step"]) for st in optimizer.state.values() if "step" in st]
            seen.append(
                (trainer.global_step, max(steps, default=0), optimizer.param_groups[0]["lr"])
            )

    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    trainer = L.Trainer(
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Probe()],
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    by_step = {g: (n, lr) for g, n, lr in seen}
    assert by_step[2][0] == 2  # Adam has taken steps 0 and 1 (reconstruction only)
    assert by_step[3][0] == 0  # cleared when the classifier loss starts at step 3
    assert by_step[4][0] == 1
    lrs = [by_step[g][1] for g in range(6)]
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-2, 2.5e-3, 5e-3, 7.5e-3])
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2)


# ----------------------------------------------------------------------------------------------
# The shape sampler
# ----------------------------------------------------------------------------------------------


def sampler(mode="uniform", every=4, seed=0, depth_choices=(), depth_prob=0.5):
    net = meta_net(blocks=["all"], depth_choices=list(depth_choices))
    return ShapeSampler(
        net, SamplingConfig(mode=mode, full_width_every=every, depth_prob=depth_prob), seed
    )


@pytest.mark.parametrize("mode", ["uniform", "per_block", "sandwich"])
def test_sampler_deterministic_in_seed_and_step(mode):
    a, b, c = sampler(mode, seed=3), sampler(mode, seed=3), sampler(mode, seed=4)
    seq_a = [a.sample(s) for s in range(40)]
    assert [b.sample(s) for s in reversed(range(40))][::-1] == seq_a  # stateless: any order
    assert a.sample(17) == seq_a[17]
    assert [c.sample(s) for s in range(40)] != seq_a


@pytest.mark.parametrize("mode", ["uniform", "per_block"])
def test_sampler_respects_range_and_full_width_every(mode):
    smp = sampler(mode, every=4)
    net = smp.net
    ranges = {b: width_range(net, b) for b in net.meta_blocks}
    assert ranges["layer3.0"] == (32, 64) and ranges["layer1.2"] == (8, 16)
    seen: dict[str, set] = {b: set() for b in net.meta_blocks}
    spreads = []
    for step in range(200):
        h = smp.sample(step)
        if step % 4 == 0:
            assert h == net.full_shape
            continue
        assert [len(s) for s in h] == [3, 3, 3]  # depth fixed without depth_choices
        net.check_shape(h)
        ratios = []
        for s, stage in enumerate(h):
            for b, w in enumerate(stage):
                name = f"layer{s + 1}.{b}"
                lo, hi = ranges[name]
                assert lo <= w <= hi
                seen[name].add(w)
                ratios.append(w / net.full_width(name))
        spreads.append(max(ratios) - min(ratios))
    if mode == "uniform":  # one relative width for every block, up to rounding
        assert max(spreads) <= 0.1
    else:
        assert max(spreads) > 0.3
    assert all(min(v) == ranges[b][0] and max(v) == ranges[b][1] for b, v in seen.items())
    assert all(len(v) > 3 for v in seen.values())
    never = sampler(mode, every=0)
    assert not any(never.is_full_step(s) for s in range(40))
    assert never.sample(0) != net.full_shape


def test_sampler_sandwich_cycles_smallest_largest():
    smp = sampler("sandwich", every=0)
    net = smp.net
    smallest = [[width_range(net, f"layer{s + 1}.{b}")[0] for b in range(3)] for s in range(3)]
    largest = net.full_shape
    assert smallest == [[8] * 3, [16] * 3, [32] * 3]
    others = []
    for step in range(30):
        h = smp.sample(step)
        if step % 3 == 0:
            assert h == smallest
        elif step % 3 == 1:
            assert h == largest
        else:
            others.append(h)
    assert any(h not in (smallest, largest) for h in others)
    with_full = sampler("sandwich", every=4)
    assert with_full.sample(0) == largest and with_full.sample(3) == smallest


def test_sampler_depth_choices_and_bad_mode():
    smp = sampler("per_block", every=0, depth_choices=[1, 2], depth_prob=1.0)
    depths = {tuple(len(s) for s in smp.sample(step)) for step in range(60)}
    assert all(set(d) <= {1, 2} for d in depths) and len(depths) > 2
    for step in range(20):
        smp.net.check_shape(smp.sample(step))
    fixed = sampler("uniform", every=0, depth_choices=[1], depth_prob=0.0)
    assert all(len(s) == 3 for step in range(20) for s in fixed.sample(step))
    with pytest.raises(ValueError, match="unknown sampling mode"):
        ShapeSampler(smp.net, SamplingConfig(mode="random"))


@pytest.mark.parametrize("coords", ["relative", "absolute"])
@pytest.mark.parametrize("freqs", [0, 3, 8])
@pytest.mark.parametrize("scale", [1.0, 0.6, 1.5])
@pytest.mark.parametrize("chunk", [1024, 7])
def test_noise_free_grid_emission_equals_the_per_query_path(freqs, scale, coords, chunk):
    """The outer-sum input layer (noise-free emissions) gives the per-query MLP's values, with
    and without autograd (the no-grad trunk runs in place), whole or in row blocks."""
    base = folded_resnet20(stage_widths=[4, 8, 8])
    inr = INRConfig(hidden=16, layers=3, freqs=freqs, coords=coords)
    net = MetaResNet(base, MetaSpec(blocks=["all"]), inr)
    net.inr.grid_chunk = chunk
    torch.manual_seed(1)
    for p in net.inr.parameters():
        p.data.normal_(0, 0.3)
    hidden = [[max(1, round(w * scale)) for w in stage] for stage in net.full_shape]
    for name in net.present_meta_tensors(hidden):
        slot, shape = net.slot_of[name], net.tensor_shape(name, hidden)
        rows, cols = shape[0], (shape[1] if slot.kind == "weight" else 1)
        raw = net.inr.raw_grid(slot, rows, cols, torch.device("cpu"))
        ref = net.inr.head(name)(fourier_features(net.inr.normalize(raw, slot), freqs))
        ref = net.inr._reshape(ref, slot, shape) / cols
        with_grad = net.inr.emit_tensor(slot, shape)
        assert with_grad.requires_grad
        with torch.no_grad():
            no_grad = net.inr.emit_tensor(slot, shape)
        tol = 1e-5 * ref.abs().max().item() + 1e-7
        assert with_grad.shape == ref.shape == no_grad.shape
        assert (with_grad - ref).abs().max().item() <= tol, name
        assert (no_grad - ref).abs().max().item() <= tol, name


def test_absolute_coordinates_keep_a_channel_at_one_coordinate_across_widths():
    base = folded_resnet20(stage_widths=[4, 8, 8])
    spec = MetaSpec(blocks=[META])
    name = f"{META}.conv1.weight"
    for coords in ("relative", "absolute"):
        net = MetaResNet(base, spec, INRConfig(hidden=8, layers=1, freqs=2, coords=coords))
        slot = net.slot_of[name]
        assert slot.full == (8, 8)
        for rows in (3, 8, 12):
            coord = net.inr.normalize(net.inr.raw_grid(slot, rows, 8, torch.device("cpu")), slot)
            r = coord[:, 1].reshape(rows, 8)[:, 0]
            den = 8 if coords == "absolute" else rows
            assert torch.allclose(r, torch.arange(rows) / den)
            # the size coordinate still tells the head which width it emits
            assert torch.allclose(coord[0, 4], torch.tensor(rows / 8.0))
    with pytest.raises(ValueError, match="hypernet.coords='pixel'"):
        INRConfig(coords="pixel")
