"""Fast metamorphic training (issue 27): stacked-head emission, per-row / per-column noise,
old checkpoints, the compiled INR trunk, the fused EMA and sparse step logging."""

from __future__ import annotations

import copy

import pytest
import torch
from test_hypernet import folded_resnet20
from test_metamorph_task import base_run, workdir  # noqa: F401, F811  (module-scoped fixtures)
from test_shared_prefix import _images, _module, _step

from metamorph.hypernet.compiled import CompileConfig
from metamorph.hypernet.inr import INRConfig, fourier_features
from metamorph.hypernet.metanet import MetaResNet, MetaSpec
from metamorph.tasks.metamorph import EMA, MetamorphConfig

torch.set_num_threads(1)

INR = INRConfig(hidden=16, layers=3, freqs=4)


def _net(blocks=("all",), seed: int = 0, inr: INRConfig = INR, **spec) -> MetaResNet:
    base = folded_resnet20(seed, stage_widths=[4, 8, 8])
    torch.manual_seed(seed + 1)
    net = MetaResNet(base, MetaSpec(blocks=list(blocks), **spec), inr)
    with torch.no_grad():  # non-trivial heads (the residual layers start near identity)
        for p in net.inr.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return net


SHAPES = [[[4, 4, 4], [8, 8, 8], [8, 8, 8]], [[2, 3, 2], [5, 5, 5], [6, 6, 6]]]


def _emit(net, batched, noise, k=1, seed=3, grad=True, mode="query"):
    net.inr.batched = batched
    net.inr.zero_grad()
    g = torch.Generator().manual_seed(seed)
    with torch.set_grad_enabled(grad):
        if mode == "query":
            out = [net.emit(h, noise=noise, generator=g, k=k) for h in SHAPES]
        else:
            out = net.emit_many(SHAPES, noise=noise, generator=g, k=k, noise_mode=mode)
        if grad:
            loss = sum(
                (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum()
                for e in out
                for v in e.values()
            )
            loss.backward()
    grads = {n: p.grad.clone() for n, p in net.inr.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize(
    "noise,k,grad", [(1.0, 1, True), (0.0, 1, True), (0.0, 1, False), (0.7, 3, False)]
)
def test_stacked_heads_emit_what_the_per_head_inr_emits(noise, k, grad):
    """Batched matmuls over stacked heads: the per-head weights and gradients (float tolerance;
    bit-identical on the CPUs measured)."""
    net = _net()
    ref, g_ref = _emit(net, False, noise, k, grad=grad)
    out, g_out = _emit(net, True, noise, k, grad=grad)
    for a, b in zip(ref, out):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)
    assert g_ref.keys() == g_out.keys()
    assert len(g_ref) == (len(list(net.inr.parameters())) if grad else 0)
    for name in g_ref:
        torch.testing.assert_close(g_out[name], g_ref[name], rtol=1e-5, atol=1e-7)


def test_heads_are_grouped_into_few_batched_matmuls():
    """Tensors with equal query counts share one batched matmul per layer."""
    net = _net()
    net.inr.batched = True
    calls = []
    orig = net.inr._stacked_trunk
    net.inr._stacked_trunk = lambda heads, pres, chunk: (
        calls.append(len(heads)) or orig(heads, pres, chunk)
    )
    with torch.no_grad():
        net.emit(SHAPES[0], noise=1.0, generator=torch.Generator().manual_seed(0))
    # 36 tensors of ResNet-20 in few groups: all stage-1 convs (4 x 4), stage-2/3 8 x 8 ...
    assert sum(calls) >= 30 and len(calls) <= 6, calls


def test_emit_many_draws_the_noise_of_separate_emissions():
    net = _net()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        one_by_one = [net.emit(h, noise=1.0, generator=g) for h in SHAPES]
        g = torch.Generator().manual_seed(5)
        together = net.emit_many(SHAPES, noise=1.0, generator=g)
    for a, b in zip(one_by_one, together):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_axis_noise_is_per_row_and_per_column_noise_through_the_per_query_head():
    """``noise_mode=axis``: the outer-sum input layer equals the head run query by query on
    coordinates whose i, r, L, R noise is the row's and c, C noise the column's."""
    for coords in ("relative", "absolute"):
        net = _net(blocks=["layer3.2"], inr=INRConfig(hidden=16, layers=3, freqs=4, coords=coords))
        name = "layer3.2.conv1.weight"
        slot = net.slot_of[name]
        shape = (6, 8, 3, 3)
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            out = net.inr.emit_tensors([(slot, shape, 0.8)], g, noise_mode="axis")[0]
        g = torch.Generator().manual_seed(9)
        u_row = torch.rand((6, 4), generator=g) - 0.5
        u_col = torch.rand((8, 2), generator=g) - 0.5
        raw = net.inr.raw_grid(slot, 6, 8, torch.device("cpu")).clone()
        rr, cc = torch.arange(6).repeat_interleave(8), torch.arange(8).repeat(6)
        raw[:, [0, 1, 3, 4]] += 0.8 * u_row[rr]
        raw[:, [2, 5]] += 0.8 * u_col[cc]
        with torch.no_grad():
            ref = net.inr.head(name)(fourier_features(net.inr.normalize(raw, slot), 4))
        ref = net.inr._reshape(ref, slot, shape) / 8
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        # differentiable, and different from the noise-free emission
        g = torch.Generator().manual_seed(9)
        again = net.inr.emit_tensors([(slot, shape, 0.8)], g, noise_mode="axis")[0]
        assert again.requires_grad
        assert not torch.allclose(out, net.inr.emit_tensor(slot, shape).detach())


def test_axis_noise_trains_and_bad_modes_fail_clearly():
    net = _net()
    out, grads = _emit(net, None, 1.0, mode="axis")
    assert len(grads) == len(list(net.inr.parameters()))
    with pytest.raises(ValueError, match="coordinate noise mode 'row'"):
        net.emit_many(SHAPES, noise=1.0, noise_mode="row")
    with pytest.raises(ValueError, match="noise_quirk"):
        net.emit_many(SHAPES, noise=1.0, quirk=True, noise_mode="axis")
    with pytest.raises(ValueError, match="coord_noise_mode"):
        MetamorphConfig(coord_noise_mode="rows")
    with pytest.raises(ValueError, match="log_every_n_steps"):
        MetamorphConfig(log_every_n_steps=0)


def test_an_old_checkpoint_loads_and_emits_the_same_weights(tmp_path):
    """The parameters keep the per-head layout (``heads.<tensor>.inp/res/scales/out``), so a
    state dict written before the stacked emission loads strictly and emits, batched, what the
    per-head code emitted from it."""
    net = _net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert any(k.startswith("inr.heads.layer3__2__conv1__weight.res.0.") for k in state)
    path = tmp_path / "old.pt"
    torch.save(state, path)
    fresh = _net(seed=7)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    fresh.inr.batched = True
    net.inr.batched = False  # the per-head reference path
    with torch.no_grad():
        for h in SHAPES:
            ref = net._emit_per_tensor(h, 0.0, None, False, 1)
            got = fresh.emit(h)
            for n in ref:  # bit-identical on the CPUs measured, bar tiny bias heads
                torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7)
            g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
            ref = net._emit_per_tensor(h, 0.9, g1, False, 3)
            got = fresh.emit(h, noise=0.9, generator=g2, k=3)
            for n in ref:
                torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7)
            fresh.inr.batched = None  # the default: per head on a CPU, bit for bit
            got = fresh.emit(h, noise=0.9, generator=torch.Generator().manual_seed(1), k=3)
            assert all(torch.equal(ref[n], got[n]) for n in ref)
            fresh.inr.batched = True


def test_same_seed_gives_the_same_initial_inr():
    """Construction order and initialisation are the per-head ones."""
    a, b = _net(), _net()
    assert all(torch.equal(p, q) for p, q in zip(a.inr.parameters(), b.inr.parameters()))
    names = [n for n, _ in a.inr.named_parameters()]
    assert "heads.layer1__0__conv1__weight.inp.weight" in names


def test_fused_ema_update_equals_a_lerp_per_tensor():
    net = _net()
    ema = EMA(net.inr, 0.9)
    ref = copy.deepcopy(ema.shadow)
    with torch.no_grad():
        for p in net.inr.parameters():
            p.add_(1.0)
    ema.update(net.inr)
    for p_s, p in zip(ref.parameters(), net.inr.parameters()):
        p_s.data.lerp_(p.detach(), 0.1)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ema.shadow.parameters()))


def test_training_metrics_are_logged_every_n_steps():
    m = _module(True, log_every_n_steps=2)
    x, y = _images()
    _, _, logged = _step(m, x, y)  # global step 0: logged
    assert "train/loss" in logged
    m.log = lambda *a, **k: pytest.fail("logged on a skipped step")
    type(m).global_step = property(lambda self: 1)
    try:
        m.training_step((x, y), 1)
    finally:
        del type(m).global_step


def test_recon_emission_joins_the_step_pass_with_the_same_losses():
    """recon_always: the full-width emission is drawn with the sampled ones (one INR pass),
    in the order the separate call drew it: the same loss and gradients as per-head eager."""
    from metamorph.tasks.metamorph import LossConfig

    x, y = _images()
    loss_cfg = LossConfig(ce=1.0, recon=1.0, recon_type="mse", kd=0.0, reg=1e-3, recon_always=True)
    ma = _module(True, widths=1)
    ma.cfg.loss = loss_cfg
    mb = copy.deepcopy(ma)
    ma.net.inr.batched, mb.net.inr.batched = False, True
    la, ga, _ = _step(ma, x, y)
    lb, gb, _ = _step(mb, x, y)
    assert la == pytest.approx(lb, rel=1e-6)
    for p, q in zip(ga, gb):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def _compiled_vs_eager(backend: str):
    x, y = _images()
    eager = _module(True, widths=2)
    compiled = copy.deepcopy(eager)
    cfg = CompileConfig(enabled=True, backend=backend, dynamic=True)
    compiled.net.inr.compile_trunk(cfg)
    l1, g1, _ = _step(eager, x, y)
    l2, g2, _ = _step(compiled, x, y)
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    # a second step at other widths reuses the graph (dynamic query counts)
    l3, _, _ = _step(compiled, x, y)
    assert l3 == l3


def test_compiled_trunk_gives_the_eager_loss_and_gradients():
    """Graph capture + AOT autograd (``backend=aot_eager``: fast); inductor in the slow test."""
    pytest.importorskip("torch._dynamo")
    _compiled_vs_eager("aot_eager")


@pytest.mark.slow
def test_inductor_compiled_trunk_gives_the_eager_loss_and_gradients():
    import shutil

    if shutil.which("g++") is None and shutil.which("gcc") is None:
        pytest.skip("inductor needs a C++ compiler on a CPU")
    _compiled_vs_eager("inductor")


def test_compile_options_fail_clearly():
    with pytest.raises(ValueError, match="reduce-overhead records CUDA graphs"):
        CompileConfig(enabled=True, mode="reduce-overhead").check_device(torch.device("cpu"))
    CompileConfig(enabled=False, mode="reduce-overhead").check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="task.compile.mode='fast'"):
        CompileConfig(mode="fast")
    with pytest.raises(ValueError, match="inductor mode"):
        CompileConfig(mode="max-autotune", backend="eager")
    with pytest.raises(ValueError, match="cache_size_limit"):
        CompileConfig(cache_size_limit=0)


def test_task_config_reads_the_new_keys(tmp_path):
    from conftest import compose_config

    from metamorph.tasks.metamorph_train import metamorph_config

    cfg = compose_config(
        "train",
        tmp_path,
        [
            "task=metamorph",
            "task.coord_noise_mode=axis",
            "task.log_every_n_steps=5",
            "task.compile.enabled=true",
            "task.compile.backend=aot_eager",
        ],
    )
    m = metamorph_config(cfg)
    assert (m.coord_noise_mode, m.log_every_n_steps) == ("axis", 5)
    assert m.compile.enabled and m.compile.backend == "aot_eager"
    bad = compose_config("train", tmp_path, ["task=metamorph", "+task.compile.modee=default"])
    with pytest.raises(ValueError, match="task.compile"):
        metamorph_config(bad)


@pytest.mark.slow
def test_step_ratio_benchmark_and_contention_job():
    from metamorph.cli.bench_steps import Contention, step_ratios

    tiny = INRConfig(hidden=8, layers=2, freqs=2)
    cpu = torch.device("cpu")
    out = step_ratios([("resnet20", "last_block")], ["eager", "axis"], 2, cpu, 1, 0, print, tiny)
    assert set(out) == {"resnet20/last_block/eager", "resnet20/last_block/axis"}
    for r in out.values():
        assert r["metamorph_ms"] > 0 and r["plain_ms"] > 0
        assert r["ratio"] == pytest.approx(r["metamorph_ms"] / r["plain_ms"], rel=0.02)
    with pytest.raises(ValueError, match="step variants"):
        step_ratios([("resnet20", "full")], ["fast"], 2, cpu, 1, 0)
    with Contention(1) as job:
        assert job.proc.is_alive()
    assert not job.proc.is_alive()


@pytest.mark.slow
def test_metamorph_train_with_the_compiled_trunk(workdir, base_run):  # noqa: F811
    """``task.compile.enabled=true`` through metamorph-train (graph capture backend: fast);
    ``reduce-overhead`` on a CPU stops with the reason before training."""
    from test_metamorph_task import compose_cfg, metamorph_overrides

    from metamorph.cli.train import run

    over = metamorph_overrides(
        base_run["base"],
        "task.compile.enabled=true",
        "task.compile.backend=aot_eager",
        "task.log_every_n_steps=2",
        "+trainer.limit_train_batches=2",
        "trainer.max_epochs=1",
        "logger=none",
    )
    summary = run(compose_cfg(workdir, workdir / "compiled", over))
    assert summary["checkpoint"]
    bad = metamorph_overrides(
        base_run["base"], "task.compile.enabled=true", "task.compile.mode=reduce-overhead"
    )
    with pytest.raises(ValueError, match="reduce-overhead records CUDA graphs"):
        run(compose_cfg(workdir, workdir / "compiled_bad", [*bad, "logger=none"]))
