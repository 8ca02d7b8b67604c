#!/usr/bin/env python
"""Time one metamorphic training step (forward, backward, AdamW step, EMA) of the NeuMeta CPU
recipe's setting -- ResNet-20, last block of stage 3 metamorphic, INR 256 x 4 x 16, batch 128,
recon x10 every step, distillation -- with the frozen prefix shared or not and 1-3 shapes per
step. Prints the median of the timed steps per variant and one JSON line.

    OMP_NUM_THREADS=2 python scripts/bench_train_step.py --base outputs/models/resnet20_ft_v2.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metamorph.hypernet.inr import INRConfig
from metamorph.hypernet.metanet import MetaResNet, MetaSpec
from metamorph.hypernet.sampling import SamplingConfig
from metamorph.io.model_file import load_model
from metamorph.tasks.metamorph import LossConfig, MetamorphConfig, MetamorphModule
from metamorph.tasks.metamorph_train import prepare_base

VARIANTS = {
    "plain, 1 shape": (False, "uniform", 1, 2),
    "shared prefix, 1 shape": (True, "uniform", 1, 2),
    "shared prefix, full + 1 shape": (True, "uniform", 2, 2),
    "shared prefix, sandwich 3 shapes": (True, "sandwich", 3, 0),
}


def time_variant(prepared, share, mode, widths, full_every, steps, warmup, batch) -> float:
    cfg = MetamorphConfig(
        spec=MetaSpec(["layer3.2"]),
        inr=INRConfig(hidden=256, layers=4, freqs=16),
        sampling=SamplingConfig(mode=mode, full_width_every=full_every, widths_per_step=widths),
        loss=LossConfig(ce=1, recon=10, recon_type="mse", recon_always=True, reg=1e-4, kd=1),
        share_prefix=share,
    )
    net = MetaResNet(prepared, cfg.spec, cfg.inr)
    module = MetamorphModule(net, cfg, teacher=net.prepared_network())
    module.log = lambda *a, **k: None
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = module.training_step((x, y), i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.on_train_batch_end(None, None, i)
        times.append(time.perf_counter() - t)
    times = sorted(times[warmup:])
    return 1000 * times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="outputs/models/resnet20_ft.json")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    prepared, _ = prepare_base(load_model(a.base), fold=True, permute=False, time_limit=0.1)
    out = {}
    for name, v in VARIANTS.items():
        out[name] = round(time_variant(prepared, *v, a.steps, a.warmup, a.batch), 1)
        print(f"{name:>34}: {out[name]:7.1f} ms/step (median of {a.steps})", flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "ms_per_step": out}))


if __name__ == "__main__":
    main()
