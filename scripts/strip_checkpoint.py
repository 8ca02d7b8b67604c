#!/usr/bin/env python
"""Shrink a metamorphic training checkpoint into an inference checkpoint.

Keeps what emission needs: the EMA weights are written into the INR (the EMA shadow, optimizer
and scheduler states are dropped) and ``ema_decay`` is set to 0 in the stored config, so
``metamorph-eval`` / ``metamorph-sample`` / ``load_metamorph_checkpoint`` emit exactly what the
EMA INR emitted. Not resumable for training. Loads and saves with ``weights_only=True`` data.

    python scripts/strip_checkpoint.py outputs/models/full_resnet20.ckpt outputs/models/full_resnet20_infer.ckpt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from metamorph.io.atomic import atomic_write  # noqa: E402
from metamorph.runtime.checkpoints import load_task_checkpoint  # noqa: E402


def strip(src: Path, dst: Path) -> dict:
    ckpt, hp = load_task_checkpoint(src, "metamorph", "metamorphic")
    state = ckpt["state_dict"]
    shadow = {k[len("ema.shadow.") :]: v for k, v in state.items() if k.startswith("ema.shadow.")}
    out_state = {}
    for k, v in state.items():
        if k.startswith("ema.shadow.") or k.startswith("teacher."):
            continue
        if k.startswith("net.inr.") and k[len("net.inr.") :] in shadow:
            v = shadow[k[len("net.inr.") :]]
        out_state[k] = v
    hp["metamorph"]["ema_decay"] = 0.0
    hp["config"]["task"]["ema_decay"] = 0.0
    hp["config"]["task"]["loss"]["kd"] = 0.0  # the teacher is not kept
    hp["metamorph"]["loss"]["kd"] = 0.0
    slim = {
        "state_dict": out_state,
        "hyper_parameters": hp,
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "pytorch-lightning_version": ckpt.get("pytorch-lightning_version"),
        "stripped_from": str(src),
    }
    atomic_write(dst, lambda tmp: torch.save(slim, tmp))
    return {"ema_applied": bool(shadow), "tensors": len(out_state), "bytes": dst.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    args = ap.parse_args()
    print(strip(args.src, args.dst))


if __name__ == "__main__":
    main()
