"""Time the evaluation of one search population sequentially and with 1 and 2 loky workers.

    OMP_NUM_THREADS=1 python scripts/bench_search_parallel.py                  # random ResNet-20
    OMP_NUM_THREADS=1 python scripts/bench_search_parallel.py --base outputs/models/resnet20_ft.json \
        --phase prune --images 500 --population 16

Each worker loads the evaluator (network, search images) once; the first call on a fresh pool
includes that start-up, so both the cold (first population) and the warm (second, different
population) times are printed. Results are checked to be identical across the three modes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="model file (default: a random ResNet-20)")
    ap.add_argument("--phase", choices=["decompose", "prune"], default="decompose")
    ap.add_argument("--images", type=int, default=256, help="search images (random tensors)")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from metamorph import create_model
    from metamorph.runtime.networks import load_any_model
    from metamorph.search import (
        DecompositionEvaluator,
        DecompositionSpace,
        PopulationEvaluator,
        PruningEvaluator,
        PruningSpace,
        channel_order,
        channel_saliency,
    )

    torch.manual_seed(args.seed)
    model = load_any_model(args.base) if args.base else create_model("resnet20")
    model.eval()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.images, 3, 32, 32, generator=g)
    y = torch.randint(0, model.arch.num_classes, (args.images,), generator=g)
    if args.phase == "decompose":
        space = DecompositionSpace(model)
        ev = DecompositionEvaluator(model, space, x, y, batch_size=256)
    else:
        space = PruningSpace(model, channel_order(channel_saliency(model, criterion="l1")))
        ev = PruningEvaluator(model, space, x, y, batch_size=256)
    rng = np.random.default_rng(args.seed)

    def population():
        X = np.empty((args.population, space.n_var))
        for i, gene in enumerate(space.genes):
            hi = gene.grid[-1] + (0.999 if gene.kind == "level" else 0.0)
            X[:, i] = rng.uniform(gene.grid[0], hi, args.population)
        return space.repair(X)

    pops = [population(), population()]
    print(
        f"{args.phase} phase, {space.n_var} genes, population {args.population}, "
        f"{args.images} images, torch threads per process 1"
    )
    t = time.perf_counter()
    ref = [PopulationEvaluator(ev, n_jobs=1)(p) for p in pops]
    seq = (time.perf_counter() - t) / 2
    print(f"  sequential (in process): {seq:7.2f} s per population")
    for n in args.workers:
        with PopulationEvaluator(ev, n_jobs=n, force_pool=True) as pe:
            t = time.perf_counter()
            r0 = pe(pops[0])
            cold = time.perf_counter() - t
            t = time.perf_counter()
            r1 = pe(pops[1])
            warm = time.perf_counter() - t
        assert [r0, r1] == ref, "parallel results differ from the sequential ones"
        print(
            f"  loky, {n} worker(s):     {warm:7.2f} s per population warm "
            f"({cold:.2f} s cold, incl. worker start-up); speed-up vs sequential {seq / warm:.2f}x"
        )


if __name__ == "__main__":
    main()
