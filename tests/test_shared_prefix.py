"""Sharing the frozen prefix between shapes and the teacher, and several shapes per training step:
the same losses and gradients as running every shape from the images, and the right shapes."""

from __future__ import annotations

import pytest
import torch
from test_hypernet import TINY, folded_resnet20, meta_net

from metamorph.hypernet.metanet import MetaResNet, MetaSpec
from metamorph.hypernet.sampling import SamplingConfig, ShapeSampler
from metamorph.tasks.metamorph import LossConfig, MetamorphConfig, MetamorphModule

torch.set_num_threads(1)


def _images(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("k", [0, 1, 4, 8, 9])
def test_block_slices_compose_to_the_whole_network(k):
    net = folded_resnet20(seed=3)
    x, _ = _images()
    full = net(x)
    torch.testing.assert_close(net(net(x, stop=k), start=k), full, rtol=1e-5, atol=1e-5)
    if k < 9:  # a prefix is an activation, not logits
        assert net(x, stop=k).dim() == 4


def test_block_slice_out_of_range_is_refused():
    net = folded_resnet20()
    with pytest.raises(ValueError, match="outside this network's 9 blocks"):
        net(torch.zeros(1, 3, 8, 8), stop=10)


def test_frozen_prefix_length():
    assert meta_net(["layer3.2"]).frozen_prefix() == 8
    assert meta_net(["layer2.1", "layer3.0"]).frozen_prefix() == 4
    assert meta_net(["all"]).frozen_prefix() == 0
    # depth sampling moves block indices: only the stem is shared
    assert meta_net(["layer3.2"], depth_choices=[1, 2, 3]).frozen_prefix() == 0
    # a trained (shared) tensor ends the prefix; a trained stem means no prefix at all
    base = folded_resnet20()
    assert (
        MetaResNet(
            base, MetaSpec(["layer3.2"]), TINY, shared=["layer2.0.conv1.bias"]
        ).frozen_prefix()
        == 3
    )
    assert (
        MetaResNet(base, MetaSpec(["layer3.2"]), TINY, shared=["conv1.weight"]).frozen_prefix()
        is None
    )
    # an inactive block (not yet metamorphic in a block schedule) is frozen
    net = meta_net(["layer2.1", "layer3.2"])
    net.set_active("layer2.1", False)
    assert net.frozen_prefix() == 8


def test_prefix_features_match_the_network_prefix():
    net = meta_net(["layer3.2"])
    x, _ = _images()
    emitted = net.emit(net.full_shape)
    n = net.frozen_prefix()
    h = net.prefix_features(x, n)
    assert not h.requires_grad
    torch.testing.assert_close(
        net(h, net.full_shape, emitted, start=n),
        net(x, net.full_shape, emitted),
        rtol=1e-5,
        atol=1e-5,
    )


def _module(share: bool, blocks=("layer3.1", "layer3.2"), widths: int = 2, **kw) -> MetamorphModule:
    base = folded_resnet20(seed=5, stage_widths=[4, 8, 8])
    cfg = MetamorphConfig(
        spec=MetaSpec(blocks=list(blocks)),
        inr=TINY,
        sampling=SamplingConfig(mode="uniform", full_width_every=2, widths_per_step=widths),
        loss=LossConfig(ce=1.0, recon=1.0, recon_type="mse", kd=1.0, reg=1e-3),
        share_prefix=share,
        **kw,
    )
    torch.manual_seed(0)
    net = MetaResNet(base, cfg.spec, cfg.inr)
    return MetamorphModule(net, cfg, teacher=net.prepared_network())


def _step(module: MetamorphModule, x, y):
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(
        name, float(torch.as_tensor(value).detach())
    )
    module.net.inr.zero_grad()
    loss = module.training_step((x, y), 0)
    loss.backward()
    grads = [p.grad.clone() for p in module.net.inr.parameters() if p.grad is not None]
    return float(loss), grads, logged


@pytest.mark.parametrize("widths", [1, 3])
def test_shared_prefix_gives_the_same_loss_and_gradients(widths):
    x, y = _images()
    shared, plain = _module(True, widths=widths), _module(False, widths=widths)
    assert shared._prefix() == 7 and plain._prefix() is None
    l1, g1, log1 = _step(shared, x, y)
    l2, g2, log2 = _step(plain, x, y)
    assert {"train/ce", "train/kd", "train/recon", "train/reg"} <= set(log1)
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_teacher_with_a_different_prefix_is_not_shared():
    module = _module(True)
    with torch.no_grad():
        module.teacher.conv1.bias.add_(0.1)  # no longer the prepared network's stem
    assert module._prefix() is None


def test_several_shapes_per_step_average_their_losses():
    """Two shapes per step (full width + one sampled): ce is the mean of the two shapes' ce."""
    x, y = _images()
    module = _module(True, widths=2)
    shapes = module.sampler.sample_step(0)
    assert shapes[0] == module.net.full_shape and shapes[1] != module.net.full_shape
    _, _, logged = _step(module, x, y)
    with torch.no_grad():
        g = module.sampler.generator(7919)
        ces = []
        for h in shapes:
            e = module.net.emit(h, noise=module.cfg.coord_noise, generator=g)
            ces.append(torch.nn.functional.cross_entropy(module.net(x, h, e), y))
    assert logged["train/ce"] == pytest.approx(float(sum(ces) / 2), rel=1e-5)
    assert logged["train/gamma"] == pytest.approx(module.net.gamma_of(shapes[1]) / 2)


def test_sandwich_with_three_widths_per_step_is_smallest_largest_random():
    net = meta_net(["layer3.2"])
    s = ShapeSampler(net, SamplingConfig(mode="sandwich", full_width_every=0, widths_per_step=3))
    for step in range(4):
        small, large, rand = (sh[2][2] for sh in s.sample_step(step))
        assert (small, large) == (32, 64) and 32 <= rand <= 64
    one = ShapeSampler(net, SamplingConfig(mode="uniform", full_width_every=4))
    assert [one.sample_step(t) for t in range(6)] == [[one.sample(t)] for t in range(6)]


def test_widths_per_step_below_one_is_refused():
    with pytest.raises(ValueError, match="widths_per_step=0"):
        ShapeSampler(meta_net(), SamplingConfig(widths_per_step=0))


def test_gradient_accumulation_draws_a_shape_per_micro_batch(monkeypatch):
    """With accumulate_grad_batches=4 and full_width_every=4 the first micro-batch of every
    group is the full width and the other three draw their own shapes (the seed paper's scheme)."""
    from types import SimpleNamespace

    module = _module(True, widths=1)
    module.cfg.sampling.full_width_every = 4
    fake = SimpleNamespace(accumulate_grad_batches=4, global_step=0)
    monkeypatch.setattr(module, "_trainer", fake)
    drawn = []
    sample_step = module.sampler.sample_step
    monkeypatch.setattr(module.sampler, "sample_step", lambda i: drawn.append(i) or sample_step(i))
    module.log = lambda *a, **k: None
    x, y = _images()
    for batch_idx in range(8):
        fake.global_step = batch_idx // 4
        module.training_step((x, y), batch_idx)
    assert drawn == list(range(8))
    shapes = [module.sampler.sample_step(i)[0] for i in range(8)]
    full = module.net.full_shape
    assert [module.sampler.is_full_step(i) for i in range(8)] == [True, False, False, False] * 2
    assert shapes[0] == shapes[4] == full
    assert len({repr(s) for s in shapes[1:4] + shapes[5:]}) > 1
    # without accumulation the index is the optimizer step
    fake.accumulate_grad_batches = 1
    fake.global_step = 5
    assert module.micro_batch(3) == 5


def test_in_place_distillation_targets_the_current_full_width_shape():
    """kd_source=full_width: the narrow shape distils from the metamorphic network's own full width
    (no gradient through it), not from the prepared teacher; the full width from the teacher."""
    x, y = _images()
    module = _module(True, widths=2)
    module.cfg.loss.kd_source = "full_width"
    with torch.no_grad():  # move the INR off the prepared weights: the two teachers differ
        g = torch.Generator().manual_seed(3)
        for p in module.net.inr.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    shapes = module.sampler.sample_step(0)
    full, narrow = shapes
    assert full == module.net.full_shape and narrow != full
    _, grads, logged = _step(module, x, y)
    assert grads
    T = module.cfg.loss.kd_temperature
    with torch.no_grad():
        g = module.sampler.generator(7919)
        em = [module.net.emit(h, noise=module.cfg.coord_noise, generator=g) for h in shapes]
        t_full = module.net(x, full, em[0])
        t_prep = module.teacher(x)

        def kl(logits, t):
            return torch.nn.functional.kl_div(
                torch.log_softmax(logits / T, 1),
                torch.log_softmax(t / T, 1),
                reduction="batchmean",
                log_target=True,
            )

        s_full, s_narrow = module.net(x, full, em[0]), module.net(x, narrow, em[1])
        expect = float((kl(s_full, t_prep) + kl(s_narrow, t_full)) * T * T / 2)
        other = float((kl(s_full, t_prep) + kl(s_narrow, t_prep)) * T * T / 2)
    assert logged["train/kd"] == pytest.approx(expect, rel=1e-4)
    assert abs(expect - other) > 1e-3 * max(expect, other)


def test_unknown_kd_source_is_a_clear_error():
    with pytest.raises(ValueError, match="kd_source='teachr'.*full_width"):
        LossConfig(kd_source="teachr")
