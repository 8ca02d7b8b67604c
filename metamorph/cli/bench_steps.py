"""Training-step benchmark of issue 27: a metamorphic step vs a plain step of the same network.

A metamorphic step here is ``MetamorphModule.training_step`` (emission, functional forward,
cross-entropy + the L2 regulariser, the frozen prefix shared) + backward + AdamW + the EMA
update, at the full width, with coordinate noise; a plain step is the same network with
BatchNorm trained by AdamW (what ``task=pretrain`` runs). Two scopes: NeuMeta's last block
(``layer3.2``) and every block (the full-network experiments), each with the INR the recipes
use. ``compile`` variants run the INR trunk through ``torch.compile`` (the first, compiling
steps are the warm-up and not timed). The contention mode starts a second job (a 2-thread
matmul loop, another process) and measures again beside it.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import torch
import torch.nn.functional as F

from metamorph.cli.bench import median_time
from metamorph.hypernet.compiled import CompileConfig
from metamorph.hypernet.inr import INRConfig
from metamorph.hypernet.metanet import MetaResNet, MetaSpec
from metamorph.hypernet.sampling import SamplingConfig
from metamorph.models import create_model, fold_batchnorm
from metamorph.models.resnet_cifar import CifarResNet, ResNetArch

# (scope name, metamorphic blocks, INR): NeuMeta's CPU recipe INR for the last block, the
# hypernet default (the full-network experiments' INR) for every block
SCOPES = {
    "last_block": (["layer3.2"], INRConfig(hidden=256, layers=4, freqs=16)),
    "full": (["all"], INRConfig(hidden=256, layers=4, freqs=16)),
}


def _batch(batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    return x, torch.randint(0, 10, (batch,), generator=g).to(device)


def metamorph_step(
    model: str,
    scope: str,
    batch: int,
    device: torch.device,
    compile_cfg: CompileConfig | None = None,
    noise_mode: str = "query",
    batched: bool | None = None,
    inr: INRConfig | None = None,
):
    """A closure running one metamorphic training step (see the module docstring); ``inr``
    replaces the scope's INR (e.g. NeuMeta's paper INR, 512 x 8 x 32)."""
    from metamorph.tasks.metamorph import LossConfig, MetamorphConfig, MetamorphModule

    blocks, scope_inr = SCOPES[scope]
    inr = inr or scope_inr
    base = create_model(model).eval()
    fold_batchnorm(base)
    cfg = MetamorphConfig(
        spec=MetaSpec(blocks=list(blocks)),
        inr=inr,
        sampling=SamplingConfig(full_width_every=1),
        loss=LossConfig(ce=1.0, recon=0.0, kd=0.0, reg=1e-4),
        coord_noise_mode=noise_mode,
    )
    net = MetaResNet(base, cfg.spec, cfg.inr)
    net.inr.batched = batched
    module = MetamorphModule(net, cfg).to(device)
    module.train()
    module.log = lambda *a, **k: None
    if compile_cfg is not None and compile_cfg.enabled:
        compile_cfg.check_device(device)
        net.inr.compile_trunk(compile_cfg)
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    x, y = _batch(batch, device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        module.training_step((x, y), 0).backward()
        opt.step()
        module.on_train_batch_end(None, None, 0)

    return step


def plain_step(model: str, batch: int, device: torch.device):
    """One AdamW step of the plain network with BatchNorm."""
    arch = create_model(model).arch.to_dict()
    net = CifarResNet(ResNetArch.from_dict(arch)).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, y = _batch(batch, device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def _matmul_job(threads: int, stop) -> None:  # the contention job (a separate process)
    torch.set_num_threads(threads)
    a = torch.randn(1024, 1024)
    while not stop.is_set():
        a @ a


class Contention:
    """A second job beside the benchmark: a ``threads``-thread fp32 matmul loop in its own
    process, for as long as the context is open."""

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads

    def __enter__(self):
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=_matmul_job, args=(self.threads, self.stop), daemon=True)
        self.proc.start()
        time.sleep(2.0)  # let it start up (import torch) before timing
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.proc.join(5)
        if self.proc.is_alive():  # still starting up (importing torch) on a busy machine
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


VARIANTS = ("eager", "axis", "batched", "compiled")


def step_ratios(
    cases: list[tuple[str, str]],
    variants: list[str],
    batch: int,
    device: torch.device,
    repeats: int,
    warmup: int,
    log=print,
    inr: INRConfig | None = None,
) -> dict:
    """``{"<model>/<scope>/<variant>": {metamorph_ms, plain_ms, ratio}}``; the plain step of a
    network is timed right after its metamorphic steps (the same machine load). Variants:
    ``eager``, ``axis`` (per-row/column noise), ``batched`` (stacked heads forced on),
    ``compiled`` (INR trunk through torch.compile; CUDA: mode reduce-overhead)."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"step variants {bad} unknown; choose from {list(VARIANTS)}")
    unknown = [s for _, s in cases if s not in SCOPES]
    if unknown:
        raise ValueError(f"scopes {unknown} unknown; choose from {list(SCOPES)}")
    out = {}
    plain_ms: dict[str, float] = {}
    for model, scope in cases:
        for variant in variants:
            kw = {"inr": inr}
            if variant.startswith("compiled"):
                kw["compile_cfg"] = CompileConfig(
                    enabled=True, mode="reduce-overhead" if device.type == "cuda" else "default"
                )
            if variant.endswith("axis"):
                kw["noise_mode"] = "axis"
            if variant.startswith("batched"):
                kw["batched"] = True
            # compiling steps are not timed: warm up longer for them
            w = warmup + (2 if variant.startswith("compiled") else 0)
            t_meta = median_time(
                metamorph_step(model, scope, batch, device, **kw), repeats, w, device
            )
            t_plain = median_time(plain_step(model, batch, device), repeats, warmup, device)
            plain_ms[model] = min(plain_ms.get(model, float("inf")), t_plain * 1e3)
            key = f"{model}/{scope}/{variant}"
            out[key] = {
                "metamorph_ms": round(t_meta * 1e3, 1),
                "plain_ms": round(t_plain * 1e3, 1),
                "ratio": round(t_meta / t_plain, 3),
            }
            log(
                f"  {key:>36}: metamorphic {t_meta * 1e3:8.1f} ms, plain {t_plain * 1e3:7.1f} ms "
                f"-> {t_meta / t_plain:.2f}x"
            )
    return out


def flop_bound(model: str, scope: str, batch: int, inr: INRConfig | None = None) -> dict:
    """FLOPs of one step (``FlopCounterMode``, CPU): the INR's emission forward + backward (per
    query and per row/column noise), the network on the emitted tensors, and the plain step;
    ``flop_ratio_*`` is the metamorphic / plain ratio a step cannot beat at equal throughput."""
    from torch.utils.flop_counter import FlopCounterMode

    blocks, scope_inr = SCOPES[scope]
    base = create_model(model).eval()
    fold_batchnorm(base)
    net = MetaResNet(base, MetaSpec(blocks=list(blocks)), inr or scope_inr)
    x, y = _batch(batch, torch.device("cpu"))
    full = net.full_shape
    res = {}
    for mode in ("query", "axis"):
        g = torch.Generator().manual_seed(0)
        with FlopCounterMode(display=False) as fc:
            e = net.emit_many([full], noise=1.0, generator=g, noise_mode=mode)[0]
            sum(v.sum() for v in e.values()).backward()
        res[f"inr_gflop_{mode}"] = round(fc.get_total_flops() / 1e9, 2)
    with torch.no_grad():
        e = {k: v.requires_grad_(True) for k, v in net.emit(full).items()}
    start = net.frozen_prefix() if scope == "last_block" else None
    with FlopCounterMode(display=False) as fc:
        inp = x if not start else net.prefix_features(x, start)
        F.cross_entropy(net(inp, full, e, start=start), y).backward()
    res["network_gflop"] = round(fc.get_total_flops() / 1e9, 2)
    plain = CifarResNet(ResNetArch.from_dict(create_model(model).arch.to_dict())).train()
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(plain(x), y).backward()
    res["plain_gflop"] = round(fc.get_total_flops() / 1e9, 2)
    for mode in ("query", "axis"):
        total = res[f"inr_gflop_{mode}"] + res["network_gflop"]
        res[f"flop_ratio_{mode}"] = round(total / res["plain_gflop"], 3)
    return res
