"""Full-network metamorphosis: block schedule, INR initialisation, freezing, anchored variant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metamorph
from metamorph.hypernet.inr import INRConfig
from metamorph.hypernet.metanet import MetaResNet, MetaSpec
from metamorph.hypernet.sampling import SamplingConfig
from metamorph.models import fold_batchnorm
from metamorph.tasks.metamorph import MetamorphConfig, MetamorphModule, ScheduleConfig
from metamorph.tasks.metamorph_train import prepare_base

torch.set_num_threads(1)
TINY = INRConfig(hidden=16, layers=2, freqs=4)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture()
def folded():
    torch.manual_seed(0)
    return fold_batchnorm(_randomize_bn(metamorph.create_model("resnet20")))


def _module(net: MetaResNet, schedule: ScheduleConfig) -> MetamorphModule:
    cfg = MetamorphConfig(
        spec=net.spec,
        inr=TINY,
        sampling=SamplingConfig(full_width_every=0),
        schedule=schedule,
        coord_noise=0.0,
        ema_decay=0.9,
    )
    return MetamorphModule(net, cfg)


ORDER = ["layer3.0", "layer3.1", "layer3.2"]


def test_schedule_activates_blocks_in_order_and_copies_heads(folded):
    net = MetaResNet(folded, MetaSpec(blocks=ORDER), TINY)
    mod = _module(net, ScheduleConfig(enabled=True, order=ORDER, epochs_per_block=2, init="copy"))
    assert net.meta_blocks == ["layer3.0"]
    # an inactive metamorphic block must stay at full width
    shape = net.full_shape
    shape[2][1] = 40
    with pytest.raises(ValueError, match="not metamorphic"):
        net.check_shape(shape)
    assert mod.apply_schedule(1) == ["layer3.0"]
    with torch.no_grad():  # train block 0's heads a little so a copy is distinguishable
        for p in net.inr.head("layer3.0.conv2.weight").parameters():
            p.add_(0.01 * torch.randn_like(p))
    active = mod.apply_schedule(2)
    assert active == ["layer3.0", "layer3.1"]
    # layer3.1 has the same tensor shapes as layer3.0's conv2 -> the copy emits the same values
    e = net.emit(net.full_shape)
    torch.testing.assert_close(
        e["layer3.1.conv2.weight"], e["layer3.0.conv2.weight"], atol=1e-5, rtol=0
    )
    # EMA shadow heads are copied too
    torch.testing.assert_close(
        mod.ema.shadow.head("layer3.1.conv2.weight").out.weight,
        mod.ema.shadow.head("layer3.0.conv2.weight").out.weight,
    )
    # idempotent: re-applying (as after a resume) does not re-copy trained heads
    with torch.no_grad():
        net.inr.head("layer3.1.conv2.weight").out.bias.add_(1.0)
    before = net.emit(net.full_shape)["layer3.1.conv2.weight"].clone()
    mod.apply_schedule(3)
    assert torch.equal(before, net.emit(net.full_shape)["layer3.1.conv2.weight"])
    assert mod.apply_schedule(10) == ORDER


def test_random_init_leaves_new_heads_untouched(folded):
    net = MetaResNet(folded, MetaSpec(blocks=ORDER), TINY)
    mod = _module(net, ScheduleConfig(enabled=True, order=ORDER, epochs_per_block=1, init="random"))
    before = {k: v.clone() for k, v in net.inr.head("layer3.1.conv1.weight").state_dict().items()}
    mod.apply_schedule(1)
    after = net.inr.head("layer3.1.conv1.weight").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_frozen_earlier_heads_keep_their_emission(folded):
    net = MetaResNet(folded, MetaSpec(blocks=ORDER), TINY)
    sched = ScheduleConfig(enabled=True, order=ORDER, epochs_per_block=1, freeze_earlier=True)
    mod = _module(net, sched)
    mod.apply_schedule(1)  # layer3.0 frozen, layer3.1 trainable
    assert not any(p.requires_grad for p in net.inr.head("layer3.0.conv1.weight").parameters())
    assert all(p.requires_grad for p in net.inr.head("layer3.1.conv1.weight").parameters())
    frozen_before = net.emit(net.full_shape)["layer3.0.conv1.weight"].clone()
    live_before = net.emit(net.full_shape)["layer3.1.conv1.weight"].clone()
    opt = torch.optim.AdamW(mod.trainable_parameters(), lr=1e-2)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        hidden = net.shape_for_gamma(0.25)
        loss = nn.functional.cross_entropy(net(x, hidden), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.emit(net.full_shape)
    assert torch.equal(frozen_before, after["layer3.0.conv1.weight"])
    assert not torch.equal(live_before, after["layer3.1.conv1.weight"])


def test_block_activity_survives_a_state_dict_round_trip(folded):
    net = MetaResNet(folded, MetaSpec(blocks=ORDER), TINY)
    mod = _module(net, ScheduleConfig(enabled=True, order=ORDER, epochs_per_block=1))
    mod.apply_schedule(1)
    state = mod.state_dict()
    net2 = MetaResNet(folded, MetaSpec(blocks=ORDER), TINY)
    mod2 = _module(net2, ScheduleConfig(enabled=True, order=ORDER, epochs_per_block=1))
    assert net2.meta_blocks == ["layer3.0"]
    mod2.load_state_dict(state)
    assert net2.meta_blocks == ["layer3.0", "layer3.1"]


def test_schedule_rejects_unknown_blocks(folded):
    net = MetaResNet(folded, MetaSpec(blocks=ORDER), TINY)
    with pytest.raises(ValueError, match="outside the scope"):
        _module(net, ScheduleConfig(enabled=True, order=["layer3.0", "layer2.0"]))


def test_importance_order_preserves_function_and_sorts_channels():
    torch.manual_seed(1)
    model = _randomize_bn(metamorph.create_model("resnet20"), seed=3)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    prepared, report = prepare_base(model, True, True, 0.05, "importance")
    with torch.no_grad():
        out = prepared(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    assert "tv_importance_order" in report
    for s in range(3):
        for b in range(3):
            w = prepared.state_dict()[f"layer{s + 1}.{b}.conv1.weight"]
            n = w.abs().flatten(1).sum(1)
            assert bool((n[:-1] >= n[1:]).all())
    with pytest.raises(ValueError, match="hidden_order"):
        prepare_base(model, True, False, 0.05, "sorted")


def test_anchored_variant_starts_from_the_prepared_network(folded):
    net = MetaResNet(folded, MetaSpec(blocks=["all"], anchor=True), TINY)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = folded(x)
        out = net(x, net.full_shape)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # below full width the anchor is the first d channels; above it, zero padding
    hidden = net.shape_for_gamma(0.0)
    hidden[2][1] = 80
    hidden[1][0] = 20
    e = net.emit(hidden)
    base = folded.state_dict()
    assert torch.equal(e["layer2.0.conv1.weight"], base["layer2.0.conv1.weight"][:20])
    assert torch.equal(e["layer3.1.conv2.weight"][:, :64], base["layer3.1.conv2.weight"])
    assert torch.equal(e["layer3.1.conv2.weight"][:, 64:], torch.zeros(64, 16, 3, 3))
    # the INR's correction is trainable: gradients reach the heads
    loss = net(x, net.shape_for_gamma(0.5)).sum()
    loss.backward()
    assert net.inr.head("layer3.2.conv1.weight").out.weight.grad.abs().sum() > 0


def test_trainable_anchor_is_shared_across_shapes_and_round_trips(folded, tmp_path):
    """scope.anchor_trainable: the anchor is one trained copy of the prepared weights, shared by
    every shape (slices of it below full width, zero-padded above), saved with the INR."""
    with pytest.raises(ValueError, match="anchor=true"):
        MetaSpec(anchor_trainable=True)
    spec = MetaSpec(blocks=["layer2.0", "layer3.1"], anchor=True, anchor_trainable=True)
    net = MetaResNet(folded, spec, TINY)
    assert sorted(net.shared.keys()) == sorted(
        f"{b}.{t}".replace(".", "__")
        for b in ("layer2.0", "layer3.1")
        for t in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")
    )
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x, net.full_shape), folded(x), atol=1e-5, rtol=1e-5)
    narrow = net.shape_for_gamma(0.5)
    net(x, narrow).square().mean().backward()
    g = net.shared["layer2__0__conv1__weight"].grad
    assert g[:16].abs().sum() > 0 and torch.equal(g[16:], torch.zeros_like(g[16:]))
    with torch.no_grad():
        net.shared["layer2__0__conv1__weight"].add_(1.0)
    wide = net.shape_for_gamma(0.0)
    wide[2][1] = 80
    e = net.emit(wide)
    base = folded.state_dict()
    assert torch.equal(e["layer2.0.conv1.weight"], base["layer2.0.conv1.weight"] + 1.0)
    assert torch.equal(e["layer3.1.conv2.weight"][:, 64:], torch.zeros(64, 16, 3, 3))
    # the frozen prepared weights (recon target, calibration reference) do not move
    assert torch.equal(net.base_tensor("layer2.0.conv1.weight"), base["layer2.0.conv1.weight"])
    torch.save(net.state_dict(), tmp_path / "n.pt")
    back = MetaResNet(folded, spec, TINY)
    back.load_state_dict(torch.load(tmp_path / "n.pt", weights_only=True))
    assert torch.equal(
        back.emit(narrow)["layer2.0.conv1.weight"], net.emit(narrow)["layer2.0.conv1.weight"]
    )


def test_shared_tensors_get_their_own_learning_rate(folded):
    from metamorph.config.schema import OptimConfig
    from metamorph.tasks.optim import build_optimizer

    net = MetaResNet(
        folded, MetaSpec(blocks=["layer3.2"], anchor=True, anchor_trainable=True), TINY
    )
    mod = _module(net, ScheduleConfig())
    mod.cfg.optim = OptimConfig(name="adamw", lr=1e-3)
    mod.cfg.shared_lr_factor = 0.1
    opt = build_optimizer(mod.param_groups(), mod.cfg.optim)
    inr_group, shared_group = opt.param_groups
    assert inr_group["lr"] == pytest.approx(1e-3) and shared_group["lr"] == pytest.approx(1e-4)
    assert len(shared_group["params"]) == 4
    assert len(inr_group["params"]) == len(list(net.inr.parameters()))


def test_shared_tensors_can_have_their_own_optimizer(folded):
    from metamorph.config.schema import OptimConfig
    from metamorph.tasks.optim import AdamWWithSGDGroups, build_optimizer

    net = MetaResNet(
        folded, MetaSpec(blocks=["layer3.2"], anchor=True, anchor_trainable=True), TINY
    )
    mod = _module(net, ScheduleConfig())
    mod.cfg.optim = OptimConfig(name="adamw", lr=1e-3)
    mod.cfg.shared_lr_factor = 0.1  # ignored once shared_optim is set
    mod.cfg.shared_optim = OptimConfig(name="sgd", lr=0.02, momentum=0.9, weight_decay=5e-4)
    opt = build_optimizer(mod.param_groups(), mod.cfg.optim)
    assert isinstance(opt, AdamWWithSGDGroups)
    inr_group, shared_group = opt.param_groups
    assert shared_group["algo"] == "sgd" and shared_group["lr"] == pytest.approx(0.02)
    assert shared_group["momentum"] == 0.9 and shared_group["weight_decay"] == 5e-4
    assert inr_group["algo"] == "adamw" and inr_group["lr"] == pytest.approx(1e-3)
    anchor = shared_group["params"][0]
    before = anchor.detach().clone()
    anchor.grad = torch.ones_like(anchor)
    opt.step()
    # plain SGD's first step: lr * (1 + momentum) * (grad + wd * w) with Nesterov
    expected = before - 0.02 * 1.9 * (1 + 5e-4 * before)
    torch.testing.assert_close(anchor.detach(), expected)


def test_shared_optimizer_can_take_only_some_shared_tensors(folded):
    from metamorph.config.schema import OptimConfig
    from metamorph.tasks.optim import build_optimizer

    net = MetaResNet(
        folded, MetaSpec(blocks=["layer3.2"], anchor=True, anchor_trainable=True), TINY
    )
    mod = _module(net, ScheduleConfig())
    mod.cfg.optim = OptimConfig(name="adamw", lr=1e-3)
    mod.cfg.shared_lr_factor = 0.5
    mod.cfg.shared_optim = OptimConfig(name="sgd", lr=0.02, momentum=0.9)
    mod.cfg.shared_optim_params = ["*.conv1.*"]
    opt = build_optimizer(mod.param_groups(), mod.cfg.optim)
    inr_group, sgd_group, rest_group = opt.param_groups
    by_id = {id(p): k for k, p in net.shared.items()}
    assert sorted(by_id[id(p)] for p in sgd_group["params"]) == [
        "layer3__2__conv1__bias",
        "layer3__2__conv1__weight",
    ]
    assert sorted(by_id[id(p)] for p in rest_group["params"]) == [
        "layer3__2__conv2__bias",
        "layer3__2__conv2__weight",
    ]
    assert sgd_group["algo"] == "sgd" and sgd_group["lr"] == pytest.approx(0.02)
    assert rest_group["algo"] == "adamw" and rest_group["lr"] == pytest.approx(5e-4)
    # a pattern that matches nothing is a typo: say which names exist
    mod.cfg.shared_optim_params = ["*.bn9*"]
    with pytest.raises(ValueError, match=r"match no shared tensor.*layer3\.2\.conv1\.weight"):
        mod.param_groups()
    # patterns without an optimizer to hand them to
    mod.cfg.shared_optim, mod.cfg.shared_optim_params = None, ["*.conv1.*"]
    with pytest.raises(ValueError, match="task.shared_optim, which is null"):
        mod.param_groups()
    mod.cfg.shared_optim_params = ["*"]
    groups = mod.param_groups()
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(5e-4)


def test_ratio_sweep_val_subset_is_seeded_and_test_uses_the_whole_split(folded, tmp_path):
    """Splits are stored class by class: a sweep must not evaluate only the first batches."""
    from types import SimpleNamespace

    from metamorph.callbacks.ratio_sweep import RatioSweep

    net = MetaResNet(folded, MetaSpec(blocks=["layer3.2"]), TINY)
    mod = _module(net, ScheduleConfig())
    mod.log = lambda *a, **k: None
    seen = []

    class DM:
        eval_batch_size = 4
        x = torch.randn(40, 3, 32, 32)
        y = torch.arange(10).repeat_interleave(4)  # class-ordered, like the real splits

        def subset(self, split, n, seed=0):
            perm = torch.randperm(40, generator=torch.Generator().manual_seed(seed))[:n]
            return self.x[perm], self.y[perm]

        def normalized_batches(self, data, device=None):
            x, y = (self.x, self.y) if isinstance(data, str) else data
            seen.append(y.clone())
            yield x, y

    trainer = SimpleNamespace(
        datamodule=DM(), default_root_dir=str(tmp_path), loggers=[], current_epoch=0
    )
    cb = RatioSweep(gammas=[0.0], max_batches=2)
    cb.run(trainer, mod, "val")
    assert len(seen[-1]) == 8 and len(set(seen[-1].tolist())) > 2  # seeded, mixed classes
    cb.run(trainer, mod, "test")
    assert torch.equal(seen[-1], DM.y)  # whole split
    assert (tmp_path / "sweep" / "test.csv").is_file() and (
        tmp_path / "sweep" / "test.png"
    ).is_file()


# ----------------------------------------------------------------------------------------------
# BN strategies (per-block variants)
# ----------------------------------------------------------------------------------------------


def test_per_block_variants_build_and_round_trip():
    from metamorph.models.resnet_cifar import CifarResNet, ResNetArch

    arch = ResNetArch(block_variants={"layer2.1": "skipinit", "layer3.0": "learnable_shortcut"})
    net = CifarResNet(arch)
    assert hasattr(net.layer2[1], "alpha") and not hasattr(net.layer2[0], "alpha")
    assert hasattr(net.layer3[0], "shortcut_scale") and net.layer1[0].variant == "standard"
    assert ResNetArch.from_dict(arch.to_dict()) == arch
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown block variant 'bn'"):
        ResNetArch(block_variants={"layer1.0": "bn"})
    with pytest.raises(ValueError, match="not a block name like 'layer3.1'"):
        ResNetArch(block_variants={"stage1": "skipinit"})
    with pytest.raises(ValueError, match="there are 3 stages"):
        ResNetArch(block_variants={"layer4.0": "skipinit"})


def test_skipinit_strategy_starts_as_identity_and_alpha_is_shared(folded):
    from metamorph.tasks.metamorph_train import apply_bn_strategy

    blocks = ["layer3.1", "layer3.2"]
    skip = apply_bn_strategy(folded, blocks, "skipinit")
    assert (
        skip.arch.variant_of("layer3.2") == "skipinit"
        and skip.arch.variant_of("layer3.0") == "standard"
    )
    assert skip.layer3[2].alpha.item() == 0.0
    # alpha = 0: the two blocks are identities, i.e. the network with stage 3 cut to one block
    shallow_arch = type(folded.arch).from_dict(folded.arch.to_dict())
    shallow_arch.hidden = [list(h) for h in folded.arch.hidden[:2]] + [folded.arch.hidden[2][:1]]
    shallow = type(folded)(shallow_arch)
    shallow.load_state_dict(
        {k: v for k, v in folded.state_dict().items() if not k.startswith(("layer3.1", "layer3.2"))}
    )
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(skip(x), shallow.eval()(x))
    net = MetaResNet(skip, MetaSpec(blocks=blocks), TINY)
    assert set(net.shared.keys()) == {"layer3__1__alpha", "layer3__2__alpha"}
    # the shared alpha receives gradients through the emitted network
    shape = net.full_shape
    shape[2][2] = 40
    net.shared["layer3__2__alpha"].data.fill_(0.5)
    net(x, shape).sum().backward()
    assert net.shared["layer3__2__alpha"].grad is not None
    assert net.shared["layer3__2__alpha"].grad.abs() > 0
    for b in ("scaled_shortcut", "learnable_shortcut"):
        out = apply_bn_strategy(folded, blocks, b)
        assert out.layer3[1].variant == b and out.layer2[2].variant == "standard"
    assert apply_bn_strategy(folded, blocks, "fold") is folded
    with pytest.raises(ValueError, match="bn_strategy='keep_bn'; choose one of"):
        apply_bn_strategy(folded, blocks, "keep_bn")


def test_function_preserving_bn_init(folded):
    """bn_init=preserve keeps the pretrained function (SkipInit alpha 1; learnable shortcut
    s = sqrt 2 with conv2 x sqrt 2); the paper's init changes it; fixed scaling is refused."""
    from metamorph.tasks.metamorph_train import apply_bn_strategy

    blocks = ["layer1.0", "layer2.1", "layer3.2"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = folded(x)
        for strategy in ("skipinit", "learnable_shortcut"):
            kept = apply_bn_strategy(folded, blocks, strategy, init="preserve")
            torch.testing.assert_close(kept(x), ref, rtol=1e-5, atol=1e-5)
            changed = apply_bn_strategy(folded, blocks, strategy)
            assert (changed(x) - ref).abs().max() > 1e-3
        # the pretrained tensors of the original are untouched
        torch.testing.assert_close(folded(x), ref)
    with pytest.raises(ValueError, match="scaled_shortcut"):
        apply_bn_strategy(folded, blocks, "scaled_shortcut", init="preserve")
    with pytest.raises(ValueError, match="bn_init"):
        apply_bn_strategy(folded, blocks, "skipinit", init="zero")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_shapes_run_with_declared_shapes_and_no_bn(folded, seed):
    net = MetaResNet(folded, MetaSpec(blocks=["all"], depth_choices=[1, 2, 3]), TINY)
    g = torch.Generator().manual_seed(seed)
    depth = [int(torch.randint(1, 4, (), generator=g)) for _ in range(3)]
    shape = [
        [int(torch.randint(1, 2 * w + 1, (), generator=g)) for _ in range(d)]
        for w, d in zip(folded.arch.stage_widths, depth)
    ]
    emitted = net.emit(shape)
    model = net.template(shape)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for s, row in enumerate(shape):
        for b, h in enumerate(row):
            assert emitted[f"layer{s + 1}.{b}.conv1.weight"].shape[0] == h
            assert emitted[f"layer{s + 1}.{b}.conv2.weight"].shape[1] == h
    assert net(torch.randn(2, 3, 32, 32), shape, emitted).shape == (2, 10)


def test_ema_of_shared_tensors_is_what_evaluation_uses(folded, tmp_path):
    """task.ema_shared: the EMA averages the shared tensors (trainable anchors, classifier) as
    well; emit_eval carries those averages while the live tensors stay in place for training."""
    spec = MetaSpec(blocks=["layer3.2"], anchor=True, anchor_trainable=True)
    net = MetaResNet(folded, spec, TINY, shared=["fc.weight", "fc.bias"])
    cfg = MetamorphConfig(
        spec=spec,
        inr=TINY,
        sampling=SamplingConfig(full_width_every=0),
        coord_noise=0.0,
        ema_decay=0.5,
        ema_shared=True,
        shared=["fc.weight", "fc.bias"],
    )
    mod = MetamorphModule(net, cfg)
    old = {k: p.detach().clone() for k, p in net.shared.items()}
    with torch.no_grad():
        for p in net.shared.values():
            p.add_(1.0)
        for p in net.inr.parameters():
            p.mul_(1.1)
    mod.ema.update(net.inr, net.shared)
    averaged = {k: old[k] + 0.5 for k in old}
    for k in old:
        torch.testing.assert_close(mod.ema.shared_shadow[k], averaged[k])
    narrow = net.shape_for_gamma(0.5)
    out = mod.emit_eval(narrow)
    # the classifier is read directly: its average travels with the emission
    torch.testing.assert_close(out["fc.weight"], averaged["fc__weight"])
    # an anchored tensor: the EMA INR's emission plus the averaged anchor, cut to the shape
    with mod.ema.swapped_into(net.inr):
        inr_only = net.inr.emit_tensor(net.slot_of["layer3.2.conv1.weight"], (32, 64, 3, 3), 0.0)
    torch.testing.assert_close(
        out["layer3.2.conv1.weight"], inr_only + averaged["layer3__2__conv1__weight"][:32]
    )
    # the live tensors are back in place, and the logits are those of the averaged network
    for k in old:
        torch.testing.assert_close(net.shared[k], old[k] + 1.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = net(x, narrow, out)
        with mod.ema.swapped_into(net.inr, net.shared):
            want = net(x, narrow)
    torch.testing.assert_close(got, want)
    # without ema_shared the live shared tensors are evaluated (the earlier behaviour)
    mod_live = MetamorphModule(net, MetamorphConfig(**{**cfg.__dict__, "ema_shared": False}))
    assert mod_live.ema.shared_shadow is None and "fc.weight" not in mod_live.emit_eval(narrow)
    # the averages are saved and restored with the module's state
    torch.save(mod.state_dict(), tmp_path / "m.pt")
    back = MetamorphModule(MetaResNet(folded, spec, TINY, shared=["fc.weight", "fc.bias"]), cfg)
    back.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    torch.testing.assert_close(back.emit_eval(narrow)["fc.weight"], averaged["fc__weight"])
    with pytest.raises(ValueError, match="ema_shared=true.*ema_decay=0.0"):
        MetamorphModule(net, MetamorphConfig(**{**cfg.__dict__, "ema_decay": 0.0}))
