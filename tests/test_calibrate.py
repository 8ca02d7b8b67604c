"""Statistics calibration of folded networks: function preservation, exact recovery of per-channel
affine perturbations, matched statistics at reduced width, clear errors, and the CLI options."""

from __future__ import annotations

import copy

import pytest
import torch

from metamorph import create_model
from metamorph.models import CifarResNet, fold_batchnorm
from metamorph.models.calibrate import calibrate_to, channel_stats, match_channel_stats


def folded_net(randomize_bn, seed=0):
    torch.manual_seed(seed)
    net = create_model("resnet20", stage_widths=[8, 12, 16], hidden_width=[8, 12, 16])
    return fold_batchnorm(randomize_bn(net, seed).eval()).eval()


def images(n=96, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_calibrating_a_network_to_itself_changes_nothing(randomize_bn):
    ref = folded_net(randomize_bn)
    net = copy.deepcopy(ref)
    x = images()
    report = calibrate_to(net, ref, x)
    assert report["convs"] == len([m for m in net.modules() if isinstance(m, torch.nn.Conv2d)])
    assert report["mean_abs_log_scale"] < 1e-5 and report["mean_abs_shift"] < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)


def test_per_channel_affine_perturbations_are_undone(randomize_bn):
    ref = folded_net(randomize_bn)
    net = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("conv1", "layer1.0.conv1", "layer2.1.conv2", "layer3.2.conv1"):
            conv = net.get_submodule(name)
            c = conv.out_channels
            a = 0.3 + 2.0 * torch.rand(c, generator=g)  # positive: ReLU commutes
            b = torch.randn(c, generator=g)
            conv.weight.mul_(a.view(-1, 1, 1, 1))
            conv.bias.mul_(a).add_(b)
    x = images()
    with torch.no_grad():
        assert (net(x) - ref(x)).abs().max() > 1e-2  # the perturbation matters
    calibrate_to(net, ref, x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(net(images(8, 7)), ref(images(8, 7)), rtol=1e-4, atol=1e-4)


def test_narrow_network_matches_the_reference_channels(randomize_bn):
    ref = folded_net(randomize_bn)
    hidden = [[4, 8, 8], [12, 6, 12], [16, 16, 9]]
    arch = copy.deepcopy(ref.arch)
    arch.hidden = hidden
    narrow = CifarResNet(arch).eval()
    state = ref.state_dict()
    new = {}
    for k, v in narrow.state_dict().items():
        src = state[k]
        new[k] = src[tuple(slice(0, n) for n in v.shape)].clone()
    narrow.load_state_dict(new)
    x = images()
    ref_stats = channel_stats(ref, x)
    match_channel_stats(narrow, ref_stats, x)
    got = channel_stats(narrow, x)
    for name, st in got.items():
        c = st.mean.numel()
        r = ref_stats[name]
        ok = r.std[:c] > 1e-3
        torch.testing.assert_close(st.mean[:c], r.mean[:c], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(st.std[:c][ok], r.std[:c][ok], atol=1e-3, rtol=1e-3)


def test_unfolded_network_is_a_clear_error():
    net = create_model("resnet20", stage_widths=[8, 12, 16], hidden_width=[8, 12, 16]).eval()
    with pytest.raises(ValueError, match="fold"):
        channel_stats(net, images(4))
    ref = fold_batchnorm(copy.deepcopy(net))
    with pytest.raises(ValueError, match="at least one image"):
        match_channel_stats(ref, channel_stats(ref, images(4)), images(0))


def test_index_maps_match_each_channel_to_its_mapped_reference_channel(randomize_bn):
    from metamorph.models.calibrate import relative_index_map

    assert relative_index_map(4, 16).tolist() == [0, 4, 8, 12]
    assert relative_index_map(3, 8).tolist() == [0, 2, 5]
    assert relative_index_map(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # wider than the reference
    ref = folded_net(randomize_bn)
    arch = copy.deepcopy(ref.arch)
    arch.hidden = [[8, 8, 8], [12, 12, 12], [16, 16, 4]]
    narrow = CifarResNet(arch).eval()
    state = ref.state_dict()
    narrow.load_state_dict(
        {
            k: state[k][tuple(slice(0, n) for n in v.shape)].clone()
            for k, v in narrow.state_dict().items()
        }
    )
    x = images()
    ref_stats = channel_stats(ref, x)
    idx = relative_index_map(4, 16)
    match_channel_stats(narrow, ref_stats, x, index_maps={"layer3.2.conv1": idx})
    got = channel_stats(narrow, x)["layer3.2.conv1"]
    torch.testing.assert_close(
        got.mean, ref_stats["layer3.2.conv1"].mean[idx], atol=1e-3, rtol=1e-3
    )
    with pytest.raises(ValueError, match="outside"):
        match_channel_stats(narrow, ref_stats, x, index_maps={"layer3.2.conv1": torch.tensor([99])})


def test_trainable_anchor_is_calibrated_to_its_own_full_width(randomize_bn):
    """With a trained anchor the full-width weights moved, so the reference statistics are the
    checkpoint's own full-width network's: calibrating that width changes nothing, while the
    prepared network's statistics would pull it back."""
    from metamorph.export.sample import materialize, prepared_stats, reference_stats_for
    from metamorph.hypernet.inr import INRConfig
    from metamorph.hypernet.metanet import MetaResNet, MetaSpec
    from metamorph.hypernet.sampling import SamplingConfig
    from metamorph.tasks.metamorph import MetamorphConfig, MetamorphModule

    base = folded_net(randomize_bn)
    spec = MetaSpec(blocks=["all"], anchor=True, anchor_trainable=True)
    inr = INRConfig(hidden=8, layers=2, freqs=2)
    net = MetaResNet(base, spec, inr)
    cfg = MetamorphConfig(spec=spec, inr=inr, sampling=SamplingConfig(), ema_decay=0.0)
    module = MetamorphModule(net, cfg)
    with torch.no_grad():  # "training" moved the shared full-width weights
        for p in net.shared.values():
            p.mul_(1.3).add_(0.05)
    x = images()
    ref = reference_stats_for(module, x)
    own = materialize(module, net.full_shape)
    torch.testing.assert_close(
        ref["layer2.1.conv1"].std, channel_stats(own, x)["layer2.1.conv1"].std
    )
    calibrated = materialize(module, net.full_shape, calibrate_images=x)
    with torch.no_grad():
        torch.testing.assert_close(calibrated(x), own(x), rtol=1e-4, atol=1e-4)
    # the prepared network is the reference without a trainable anchor
    frozen = MetamorphModule(MetaResNet(base, MetaSpec(blocks=["all"], anchor=True), inr), cfg)
    prep = prepared_stats(frozen.net, x)
    torch.testing.assert_close(
        reference_stats_for(frozen, x)["layer1.0.conv1"].mean, prep["layer1.0.conv1"].mean
    )
    assert not torch.allclose(ref["layer1.0.conv1"].mean, prep["layer1.0.conv1"].mean)
