#!/usr/bin/env python
"""Write the network a kept-BN metamorphic run starts from at one shape, as a model file.

The prepared base (BN folded, channels permuted, hidden channels in importance order) with
BatchNorm re-inserted in every block (``prepare.bn_scale``), cut to ``--gamma`` (the anchor's first
d hidden channels: L1 pruning of the folded weights), with that shape's BN statistics on the
1,024 seeded training images a run stores. Fine-tuning this file with the individual baseline's
recipe (``metamorph-train experiment=baselines/recipe/individual_resnet20_cifar10_cpu model.init=<out>.json``)
separates what the starting point costs from what the metamorphic training loop costs
(issue 4: a single-shape metamorphic run stays ~2.5 points below the individual network).

Example::

    OMP_NUM_THREADS=1 python scripts/diag_start_network.py --base outputs/models/resnet20_ft_v2.json \\
        --data-root ../shared/data/cifar10-jpeg --gamma 0.5 --out outputs/models/diag/start_g0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from metamorph.hypernet.inr import INRConfig  # noqa: E402
from metamorph.hypernet.metanet import MetaResNet, MetaSpec, block_names  # noqa: E402
from metamorph.io.model_file import save_model  # noqa: E402
from metamorph.runtime.data import build_datamodule  # noqa: E402
from metamorph.runtime.networks import load_any_model  # noqa: E402
from metamorph.tasks.metamorph_train import apply_bn_strategy, prepare_base  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--bn-scale", default="identity", choices=["identity", "unit"])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    prepared, _ = prepare_base(load_any_model(a.base), True, True, 1.0, "importance")
    data = OmegaConf.load(REPO / "metamorph" / "conf" / "data" / "cifar10.yaml")
    data.root, data.val_size = a.data_root, 5000  # as the full-network experiments
    dm = build_datamodule(data, mean=prepared.arch.mean, std=prepared.arch.std, seed=a.seed)
    dm.setup("fit")
    calib, _ = dm.subset("train", a.images, seed=a.seed)
    blocks = block_names(prepared.arch)
    kept = apply_bn_strategy(
        prepared, blocks, "keep", images=dm.transform_batch(calib), bn_scale=a.bn_scale
    )
    net = MetaResNet(kept, MetaSpec(blocks=["all"], anchor=True), INRConfig(hidden=8, layers=1))
    net.set_bn_calibration(calib)
    hidden = net.shape_for_gamma(a.gamma)
    emitted = {
        n: net.anchor_tensor(n, net.tensor_shape(n, hidden))
        for n in net.present_meta_tensors(hidden)
    }
    emitted.update(net.bn_statistics(hidden, emitted))
    model = net.materialize(hidden, emitted=emitted)
    path = save_model(
        model, a.out, meta={"source": a.base, "gamma": a.gamma, "bn_scale": a.bn_scale}
    )
    print(f"wrote {path} hidden={hidden}")


if __name__ == "__main__":
    main()
