"""The block-sequence protocol and its CIFAR ResNet adapter."""

import pytest
import torch
from torch import nn

from metamorph.models import CifarResNet, cifar_resnet_arch
from metamorph.models.blockseq import (
    BlockSeq,
    ResNetBlockSeq,
    as_block_seq,
    block_outputs,
    can_stitch,
    check_block_seq,
    input_dim,
    input_stage,
    run_blocks,
)


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    net = CifarResNet(cifar_resnet_arch(depth=8, stage_widths=(4, 8, 16), **kw))
    for m in net.modules():  # non-trivial BN statistics so eval-mode forward tests them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_adapter_forward_equals_resnet():
    net = _net(blocks_per_stage=[2, 1, 2])
    seq = as_block_seq(net)
    assert isinstance(seq, ResNetBlockSeq) and isinstance(seq, BlockSeq)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(seq(x), net(x))
    outs, logits = block_outputs(seq, x)
    torch.testing.assert_close(logits, net(x))
    assert [o.shape[1] for o in outs] == seq.block_dims == [4, 4, 8, 16, 16]
    assert seq.block_stages == [0, 0, 1, 2, 2]
    for k in range(len(seq.blocks) + 1):
        torch.testing.assert_close(run_blocks(seq, x, stop=k), net(x, stop=k))
        torch.testing.assert_close(run_blocks(seq, run_blocks(seq, x, stop=k), start=k), net(x))


def test_adapter_shares_parameters_and_maps_names_back():
    net = _net()
    seq = ResNetBlockSeq(net)
    assert {id(p) for p in seq.parameters()} == {id(p) for p in net.parameters()}
    assert seq.resnet_state_dict().keys() == net.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(seq.to_resnet().eval()(x), net(x))


def test_stitch_compatibility_and_input_widths():
    a, b = ResNetBlockSeq(_net()), ResNetBlockSeq(_net(1))
    assert input_stage(b, 0) == 0 and input_dim(b, 0) == 4
    assert input_dim(b, 2) == 8 and input_stage(b, 2) == 1
    assert can_stitch(a, 0, b, 1)  # stage 0 -> block 1 (stride-2 block, input stage 0)
    assert not can_stitch(a, 0, b, 2)  # stage 0 output into a stage-1 input
    assert can_stitch(a, 1, b, 2)


def test_bad_networks_give_clear_errors():
    with pytest.raises(TypeError, match="lacks"):
        check_block_seq(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="CifarResNet"):
        ResNetBlockSeq(nn.Linear(2, 2))
    seq = ResNetBlockSeq(_net())
    with pytest.raises(ValueError, match="outside"):
        run_blocks(seq, torch.randn(1, 3, 32, 32), stop=9)
