"""The "keep BN" strategy: metamorphic blocks keep a BatchNorm after each conv, trained with batch
statistics, shared affine parameters cut to the shape, per-shape statistics for evaluation."""

from __future__ import annotations

import pytest
import torch
from test_hypernet import TINY, folded_resnet20

from metamorph.export.sample import materialize
from metamorph.hypernet.metanet import MetaResNet, MetaSpec
from metamorph.models import CifarResNet, fold_batchnorm, insert_batchnorm
from metamorph.models.resnet_cifar import ResNetArch
from metamorph.tasks.metamorph import MetamorphConfig, MetamorphModule
from metamorph.tasks.metamorph_train import apply_bn_strategy

torch.set_num_threads(1)
BLOCKS = ["layer2.1", "layer3.2"]


def _images(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folded():
    return folded_resnet20(seed=2)


@pytest.fixture(scope="module")
def kept(folded):
    return insert_batchnorm(folded, BLOCKS, _images())


def _module(kept, anchor: bool = True) -> MetamorphModule:
    cfg = MetamorphConfig(spec=MetaSpec(blocks=BLOCKS, anchor=anchor), inr=TINY)
    torch.manual_seed(0)
    net = MetaResNet(kept, cfg.spec, cfg.inr)
    net.set_bn_calibration(_images(96, seed=1))
    return MetamorphModule(net, cfg)


def test_inserted_batchnorm_keeps_the_function(folded, kept):
    x = _images()
    assert kept.arch.bn_blocks == BLOCKS and not kept.arch.bn
    assert isinstance(kept.layer3[2].bn1, torch.nn.BatchNorm2d)
    assert isinstance(kept.layer3[1].bn1, torch.nn.Identity)
    ref = folded(x)
    torch.testing.assert_close(kept.eval()(x), ref, rtol=1e-5, atol=1e-4)
    # with batch statistics of the same images, too
    torch.testing.assert_close(kept.train()(x), ref, rtol=1e-4, atol=1e-3)
    kept.eval()
    # folding it again gives a plain folded network with the same function
    again = fold_batchnorm(insert_batchnorm(folded, BLOCKS, x))
    assert again.arch.bn_blocks == [] and all(
        not isinstance(m, torch.nn.BatchNorm2d) for m in again.modules()
    )
    torch.testing.assert_close(again(x), ref, rtol=1e-5, atol=1e-4)


def test_unit_bn_scale_keeps_the_function_and_normalizes_the_conv_outputs(folded):
    """prepare.bn_scale=unit: each kept conv's output channels start at unit variance (its
    weights rescaled, the BN affine compensating), with the network's function unchanged."""
    from metamorph.models.calibrate import channel_stats

    x = _images()
    unit = insert_batchnorm(folded, BLOCKS, x, scale="unit")
    ident = insert_batchnorm(folded, BLOCKS, x)
    ref = folded(x)
    torch.testing.assert_close(unit.eval()(x), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(unit.train()(x), ref, rtol=1e-4, atol=1e-3)
    unit.eval()
    w_unit, w_id = unit.layer3[2].conv1.weight, ident.layer3[2].conv1.weight
    ratio = (w_unit.flatten(1).norm(dim=1) / w_id.flatten(1).norm(dim=1)).detach()
    # the conv was rescaled by 1 / std of its own output, channel by channel
    sd = channel_stats(folded, x)["layer3.2.conv1"].std
    torch.testing.assert_close(ratio, 1.0 / sd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        unit.layer3[2].bn1.running_var, torch.ones_like(sd), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match="bn_scale='unity'; choose identity or unit"):
        insert_batchnorm(folded, BLOCKS, x, scale="unity")
    kept = apply_bn_strategy(folded, BLOCKS, "keep", images=x, bn_scale="unit")
    torch.testing.assert_close(kept.layer3[2].conv1.weight, w_unit)


def test_arch_round_trip_and_bad_block_name():
    arch = ResNetArch(bn=False, bn_blocks=["layer1.0"])
    assert ResNetArch.from_dict(arch.to_dict()).bn_blocks == ["layer1.0"]
    with pytest.raises(ValueError, match="bn_blocks entry 'block3'"):
        ResNetArch(bn=False, bn_blocks=["block3"])


def test_keep_strategy_needs_images_and_kept_blocks_must_be_metamorphic(folded, kept):
    with pytest.raises(ValueError, match="needs training images"):
        apply_bn_strategy(folded, BLOCKS, "keep")
    with pytest.raises(ValueError, match="keep BatchNorm but are not metamorphic"):
        MetaResNet(kept, MetaSpec(blocks=["layer3.2"]), TINY)


def test_training_uses_batch_statistics_and_trains_the_shared_affine(kept):
    module = _module(kept)
    net = module.net
    assert {
        f"{b}__{t}" for b in ("layer2__1", "layer3__2") for t in ("bn1__weight", "bn2__bias")
    } <= set(net.shared.keys())
    assert net.frozen_prefix() == 4  # stops at the first block with BatchNorm
    before = {k: v.clone() for k, v in net.named_buffers()}
    h = net.shape_for_gamma(0.5)
    net.train()
    x = _images(32, seed=3)
    out = net(x, h, net.emit(h))
    out.square().mean().backward()
    g = net.shared["layer3__2__bn1__weight"].grad
    assert g is not None and g.abs().sum() > 0
    assert g[h[2][2] :].abs().sum() == 0  # only the kept slice of the shared parameter
    # batch statistics: the stored prepared statistics did not move
    assert all(torch.equal(v, before[k]) for k, v in net.named_buffers())


def test_evaluation_needs_and_gets_per_shape_statistics(kept):
    module = _module(kept)
    net = module.net.eval()
    x = _images(16, seed=4)
    for gamma in (0.0, 0.25, 0.5, 0.75):
        h = net.shape_for_gamma(gamma)
        with pytest.raises(ValueError, match="no BatchNorm statistics for this shape"):
            net(x, h, net.emit(h))
        em = module.emit_eval(h, k=1)
        mean = em["layer3.2.bn1.running_mean"]
        assert mean.shape == (h[2][2],)
        # the statistics are those of this shape's batch-statistics pass over the stored images
        calib = net.bn_calib  # stored normalized (float) here
        tmpl = net.template(h).train()
        params = net.params_for(h, em, fresh_bn_stats=True)
        feats: list[torch.Tensor] = []
        hook = tmpl.layer3[2].conv1.register_forward_hook(lambda m, i, o, out=feats: out.append(o))
        try:
            torch.func.functional_call(tmpl, params, (calib,))
        finally:
            hook.remove()
            tmpl.eval()
        expect = feats[0].transpose(0, 1).reshape(h[2][2], -1).mean(1)
        torch.testing.assert_close(mean, expect, rtol=1e-4, atol=1e-4)
        # evaluation is per image (no batch dependence)
        logits = net(x, h, em)
        torch.testing.assert_close(net(x[:1], h, em), logits[:1], rtol=1e-5, atol=1e-5)


def test_statistics_of_stored_raw_images_are_taken_on_augmented_copies(kept):
    """uint8 calibration images are crop+flip augmented (fixed seed) before the statistics
    pass, as the training batches were; ``bn_augment = False`` takes them as they are."""
    from metamorph.data.transforms import normalize, random_crop_flip

    module = _module(kept)
    net = module.net.eval()
    raw = torch.randint(
        0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(7)
    )
    net.set_bn_calibration(raw)
    h = net.shape_for_gamma(0.25)
    em = net.emit(h)

    def conv1_mean(images: torch.Tensor) -> torch.Tensor:
        tmpl = net.template(h).train()
        feats: list[torch.Tensor] = []
        hook = tmpl.layer3[2].conv1.register_forward_hook(lambda m, i, o, out=feats: out.append(o))
        try:
            torch.func.functional_call(tmpl, net.params_for(h, em, fresh_bn_stats=True), (images,))
        finally:
            hook.remove()
        return feats[0].transpose(0, 1).reshape(h[2][2], -1).mean(1)

    mean, std = net.base_arch.mean, net.base_arch.std
    g = torch.Generator().manual_seed(net.bn_augment_seed)
    augmented = normalize(random_crop_flip(raw, padding=4, generator=g), mean, std)
    got = net.bn_statistics(h, em)["layer3.2.bn1.running_mean"]
    torch.testing.assert_close(got, conv1_mean(augmented), rtol=1e-4, atol=1e-4)
    # deterministic: the same statistics on every call
    torch.testing.assert_close(net.bn_statistics(h, em)["layer3.2.bn1.running_mean"], got)
    net.bn_augment = False
    plain = net.bn_statistics(h, em)["layer3.2.bn1.running_mean"]
    torch.testing.assert_close(plain, conv1_mean(normalize(raw, mean, std)), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, got, atol=1e-3)


def test_materialized_and_exported_networks_match_the_metamorphic_one(kept):
    module = _module(kept)
    net = module.net.eval()
    x = _images(16, seed=5)
    h = net.shape_for_gamma(0.5)
    ref = net(x, h, module.emit_eval(h, k=1))
    plain = net.materialize(h)
    assert isinstance(plain, CifarResNet) and plain.arch.bn_blocks == BLOCKS
    torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-5)
    deploy = materialize(module, h, k=1)  # folded for deployment
    assert deploy.arch.bn_blocks == [] and not any(
        isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules()
    )
    torch.testing.assert_close(deploy(x), ref, rtol=1e-4, atol=1e-4)


def test_calibration_images_round_trip_in_the_state_dict(kept):
    module = _module(kept)
    state = module.net.state_dict()
    assert state["bn_calib"].shape == (96, 3, 16, 16)
    fresh = MetaResNet(kept, module.net.spec, TINY)
    assert fresh.bn_calib.numel() == 0
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bn_calib, module.net.bn_calib)
    h = fresh.shape_for_gamma(0.25)
    a = module.net.bn_statistics(h, module.net.emit(h))
    b = fresh.bn_statistics(h, fresh.emit(h))
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float()) for k in a)


def test_missing_calibration_images_is_a_clear_error(kept):
    net = MetaResNet(kept, MetaSpec(blocks=BLOCKS), TINY).eval()
    h = net.full_shape
    with pytest.raises(ValueError, match="no calibration images"):
        net.bn_statistics(h, net.emit(h))


def test_keep_strategy_end_to_end_through_hydra(tmp_path):
    """metamorph-train with prepare.bn_strategy=keep: trains, sweeps, checkpoints; the loaded
    checkpoint gives the same per-shape statistics and logits."""
    from test_metamorph_task import DATA, compose_cfg, metamorph_overrides

    from metamorph.cli.train import run
    from metamorph.tasks.metamorph_train import load_metamorph_checkpoint

    base = compose_cfg(
        tmp_path,
        tmp_path / "pretrain",
        [
            "task=pretrain",
            *DATA,
            "+trainer.limit_train_batches=2",
            "trainer.max_epochs=1",
            f"export_to={tmp_path / 'base'}",
            "logger=none",
        ],
    )
    run(base)
    out = tmp_path / "mm"
    cfg = compose_cfg(
        tmp_path,
        out,
        metamorph_overrides(
            tmp_path / "base.json",
            "task.prepare.bn_strategy=keep",
            "task.prepare.bn_calibration_images=48",
            "task.scope.blocks=[layer3.1,layer3.2]",
            "task.sampling.widths_per_step=2",
            "trainer.max_steps=4",
            "trainer.max_epochs=2",
        ),
    )
    summary = run(cfg)
    sweep = summary["test_sweep"]
    assert sweep and all(0.0 <= v <= 100.0 for v in sweep.values())
    loaded = load_metamorph_checkpoint(out / "metamorph.ckpt")
    net = loaded.net
    assert net.base_arch.bn_blocks == ["layer3.1", "layer3.2"]
    assert net.bn_calib.shape[0] == 48 and net.bn_calib.dtype == torch.uint8
    h = net.shape_for_gamma(0.5)
    em = loaded.emit_eval(h, k=1)
    assert em["layer3.2.bn1.running_var"].shape == (h[2][2],)
    x = torch.randn(4, 3, 32, 32)
    logits = net(x, h, em)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(materialize(loaded, h, k=1)(x), logits, rtol=1e-4, atol=1e-4)
    _bn_images_in_sample_and_eval(tmp_path, out / "metamorph.ckpt", loaded, x)


def _bn_images_in_sample_and_eval(tmp_path, ckpt, loaded, x):
    """``bn_images=N``: each shape's BN statistics on N seeded training images instead of the
    stored ones, in metamorph-sample (recorded in the model file) and in metamorph-eval."""
    from conftest import TINY_DATA, compose_config

    import metamorph
    from metamorph.cli import evaluate, sample
    from metamorph.runtime.data import build_datamodule

    def sampled(n):
        cfg = compose_config(
            "sample",
            tmp_path,
            [
                *TINY_DATA,
                "threads=1",
                f"ckpt={ckpt}",
                "gamma=0.5",
                "k=1",
                f"bn_images={n}",
                f"out={tmp_path / f'bn{n}'}",
            ],
        )
        s = sample.run(cfg)
        return cfg, metamorph.load(s["model"])

    _, stored = sampled(0)
    cfg, more = sampled(32)
    assert stored.meta["bn_statistics_images"] == 48 and more.meta["bn_statistics_images"] == 32
    net = loaded.net
    h = net.shape_for_gamma(0.5)
    dm = build_datamodule(cfg.data, mean=net.base_arch.mean, std=net.base_arch.std, seed=0)
    dm.setup("fit")
    keep = net.bn_calib.clone()
    try:
        net.set_bn_calibration(dm.subset("train", 32, seed=0)[0])  # raw: augmented in the pass
        expect = materialize(loaded, h, k=1)(x)
    finally:
        net.set_bn_calibration(keep)
    with torch.no_grad():
        torch.testing.assert_close(more(x), expect, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(stored(x), expect, atol=1e-4)  # other statistics, other logits
    ev = compose_config(
        "eval",
        tmp_path,
        [
            *TINY_DATA,
            "split=val",
            "device=cpu",
            "latency=false",
            f"src={ckpt}",
            f"out_dir={tmp_path / 'ev'}",
            "sweep.gammas=[0,0.5]",
            "sweep.bn_images=32",
            "sweep.widths_above=[1.25]",
        ],
    )
    res = evaluate.run(ev)
    md = (tmp_path / "ev" / "sweep.md").read_text()
    assert "BN statistics of each shape on 32 train images (crop+flip augmented)" in md
    wide = next(p for p in res["points"] if p["label"] == "x1.25")
    assert wide["hidden"][2][2] == round(1.25 * net.base_arch.hidden[2][2]) and not wide["seen"]
    ev.out_dir = str(tmp_path / "ev_plain")
    ev.sweep.bn_augment = False
    evaluate.run(ev)
    assert "(not augmented)" in (tmp_path / "ev_plain" / "sweep.md").read_text()
    ev.out_dir = str(tmp_path / "ev_bad")
    ev.sweep.widths_above = [0.9]
    with pytest.raises(ValueError, match="widths_above contains 0.9"):
        evaluate.run(ev)
    assert more.meta["bn_statistics_augmented"] is True
    with pytest.raises(ValueError, match="bn_images=-1 must be 0"):
        sample.run(
            compose_config(
                "sample",
                tmp_path,
                [
                    *TINY_DATA,
                    f"ckpt={ckpt}",
                    "gamma=0.5",
                    "bn_images=-1",
                    f"out={tmp_path / 'neg'}",
                ],
            )
        )


def test_checkpoints_without_calibration_images_still_load():
    """Networks saved before kept BatchNorm existed have no ``bn_calib`` entry."""
    from test_hypernet import meta_net

    net = meta_net(["layer3.2"])
    state = {k: v for k, v in net.state_dict().items() if k != "bn_calib"}
    fresh = meta_net(["layer3.2"])
    fresh.load_state_dict(state)  # strict
    assert fresh.bn_calib.numel() == 0
    h = fresh.shape_for_gamma(0.5)
    assert fresh.bn_statistics(h, fresh.emit(h)) == {}


def _bias_module(kept, on: bool) -> MetamorphModule:
    cfg = MetamorphConfig(spec=MetaSpec(blocks=BLOCKS, anchor=True, bias_after_bn=on), inr=TINY)
    torch.manual_seed(0)
    net = MetaResNet(kept, cfg.spec, cfg.inr)
    net.set_bn_calibration(_images(96, seed=1))
    with torch.no_grad():  # move the INR off its zero-output start so corrections are non-zero
        g = torch.Generator().manual_seed(7)
        for p in net.inr.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return MetamorphModule(net, cfg)


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_bias_after_bn_turns_the_dead_bias_heads_into_a_per_shape_bn_shift(kept, gamma):
    x = _images(32, seed=6)
    outs = {}
    for on in (False, True):
        net = _bias_module(kept, on).net.train()
        h = net.shape_for_gamma(gamma)
        em = net.emit(h)
        bumped = dict(em, **{"layer3.2.conv1.bias": em["layer3.2.conv1.bias"] + 1.0})
        base, moved = net(x, h, em), net(x, h, bumped)
        if not on:  # the BN cancels the conv bias: the bias head cannot act
            torch.testing.assert_close(moved, base, rtol=1e-4, atol=1e-4)
            outs[on] = base
            continue
        assert (moved - base).abs().max() > 1e-2
        # the shift lands on the BN's beta: conv bias change c == beta + c
        params = net.params_for(h, em, fresh_bn_stats=True)
        for blk in BLOCKS:
            for i in (1, 2):
                b = em[f"{blk}.conv{i}.bias"]
                shift = b - net.anchor_tensor(f"{blk}.conv{i}.bias", tuple(b.shape))
                assert shift.abs().max() > 0
                beta = net.anchor_tensor(f"{blk}.bn{i}.bias", tuple(b.shape))
                torch.testing.assert_close(params[f"{blk}.bn{i}.bias"], beta + shift)
        # gradients now reach the INR through its bias outputs
        net.zero_grad()
        net(x, h, net.emit(h)).square().mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.inr.parameters())
        assert (base - outs[False]).abs().max() > 1e-3  # same INR, different function


def test_bias_after_bn_materializes_and_exports_the_same_function(kept):
    module = _bias_module(kept, True)
    net = module.net.eval()
    x = _images(16, seed=8)
    h = net.shape_for_gamma(0.25)
    ref = net(x, h, module.emit_eval(h, k=1))
    torch.testing.assert_close(net.materialize(h)(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(materialize(module, h, k=1)(x), ref, rtol=1e-4, atol=1e-4)


def test_bias_after_bn_needs_kept_batchnorm(folded):
    with pytest.raises(ValueError, match="bias_after_bn=true needs BatchNorm kept"):
        MetaResNet(folded, MetaSpec(blocks=BLOCKS, anchor=True, bias_after_bn=True), TINY)
