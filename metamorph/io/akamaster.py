"""Import of the public akamaster CIFAR ResNet checkpoints (pickled dicts, ``module.`` prefix)."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from metamorph.models.resnet_cifar import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CifarResNet,
    cifar_resnet_arch,
)

# The only non-tensor globals these files need beyond torch's weights_only defaults: none.
# (best_prec1 is a float, state_dict an OrderedDict, both allowed.) Kept explicit on purpose.
AKAMASTER_ALLOWED_GLOBALS: list = []


def load_untrusted_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict:
    """``torch.load`` with ``weights_only=True`` and an explicit allow-list; never runs code.

    The one reader of pickled checkpoints (foreign ones and Lightning's): a missing file, objects
    outside the allow-list and truncated or corrupt data are clear errors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        with torch.serialization.safe_globals(AKAMASTER_ALLOWED_GLOBALS):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # a class or function the file wants to run
            raise ValueError(
                f"{path} needs objects outside the weights-only allow-list and was not loaded: {e}"
            ) from e
        raise ValueError(f"{path} is truncated, corrupt or not a checkpoint: {e}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is truncated, corrupt or not a checkpoint: {e}") from e
    return obj


def akamaster_to_metamorph(state: dict) -> tuple[CifarResNet, float | None]:
    """Build a :class:`CifarResNet` holding the weights of an akamaster checkpoint dict."""
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError("not an akamaster checkpoint: expected a dict with a 'state_dict' key")
    sd = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
    blocks = [k for k in sd if re.fullmatch(r"layer\d+\.\d+\.conv1\.weight", k)]
    if not blocks or "linear.weight" not in sd:
        raise ValueError(
            "state_dict lacks layerX.Y.conv1.weight / linear.weight: not a CIFAR ResNet"
        )
    num_stages = max(int(k.split(".")[0][5:]) for k in blocks)
    per_stage = [
        sum(1 for k in blocks if k.startswith(f"layer{s + 1}.")) for s in range(num_stages)
    ]
    if len(set(per_stage)) != 1:
        raise ValueError(f"uneven blocks per stage {per_stage}: not a 6n+2 CIFAR ResNet")
    n = per_stage[0]
    stage_widths = [int(sd[f"layer{s + 1}.0.conv2.weight"].shape[0]) for s in range(num_stages)]
    hidden = [
        [int(sd[f"layer{s + 1}.{b}.conv1.weight"].shape[0]) for b in range(n)]
        for s in range(num_stages)
    ]
    arch = cifar_resnet_arch(
        depth=6 * n + 2,
        num_classes=int(sd["linear.weight"].shape[0]),
        stage_widths=stage_widths,
        hidden=hidden,
        shortcut="A",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    model = CifarResNet(arch)
    renamed = {
        ("fc." + k[len("linear.") :] if k.startswith("linear.") else k): v for k, v in sd.items()
    }
    target = model.state_dict()
    for k, v in target.items():
        if k.endswith("num_batches_tracked") and k not in renamed:
            renamed[k] = v
    missing = sorted(set(target) - set(renamed))
    unexpected = sorted(set(renamed) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match ResNet-{arch.depth}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(renamed)
    best = state.get("best_prec1")
    return model.eval(), (float(best) if best is not None else None)
