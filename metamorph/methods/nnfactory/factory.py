"""The trained factory on disk: supernet + assembler + task split in one safetensors + JSON pair.

What ``metamorph-customize method=nnfactory`` loads; like a model file, loading never unpickles
(the JSON holds the architecture and settings, the safetensors file the tensors), and both files
are written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metamorph.io.model_file import (
    load_model,
    pair_paths,
    read_pair_json,
    read_pair_tensors,
    write_pair,
)
from metamorph.methods.nnfactory.assembler import Assembler
from metamorph.methods.nnfactory.class_tasks import CIFAR10_CLASSES, TaskSplit
from metamorph.methods.nnfactory.supernet import ModularSupernet
from metamorph.models.resnet_cifar import CifarResNet, ResNetArch

FORMAT = "metamorph.nnfactory/v1"
META_KEY = "nnfactory"


@dataclass
class Factory:
    supernet: ModularSupernet
    assembler: Assembler
    split: TaskSplit
    classes: list[str] = field(default_factory=lambda: list(CIFAR10_CLASSES))
    mask_mode: str = "topk"
    tau: float = 1.0
    meta: dict = field(default_factory=dict)

    def eval(self) -> Factory:
        self.supernet.eval()
        self.assembler.eval()
        return self


def save_factory(f: Factory, path: str | os.PathLike) -> Path:
    """Write the factory; returns the JSON path."""
    tensors = {f"net.{k}": v for k, v in f.supernet.net.state_dict().items()}
    tensors.update({f"assembler.{k}": v for k, v in f.assembler.state_dict().items()})
    doc = {
        "format": FORMAT,
        "arch": f.supernet.arch.to_dict(),
        "groups": f.supernet.groups,
        "assembler": f.assembler.config(),
        "mask_mode": f.mask_mode,
        "tau": f.tau,
        "split": f.split.to_dict(),
        "classes": list(f.classes),
        "meta": f.meta,
    }
    pair_paths(path)[0].parent.mkdir(parents=True, exist_ok=True)
    return write_pair(path, tensors, doc)


def load_factory(path: str | os.PathLike) -> Factory:
    doc = read_pair_json(
        path,
        FORMAT,
        missing="factory file {path} not found; train one with metamorph-train "
        "experiment=nnfactory/recipe/assembler_resnet20_cifar10_cpu",
        what="an NN-Factory factory",
        fix="task=nnfactory_assembler writes one (factory.json)",
    )
    tensors = read_pair_tensors(path)
    net = CifarResNet(ResNetArch.from_dict(doc["arch"]))
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    supernet = ModularSupernet(net, int(doc["groups"]))
    assembler = Assembler(**doc["assembler"])
    assembler.load_state_dict(
        {k[len("assembler.") :]: v for k, v in tensors.items() if k.startswith("assembler.")}
    )
    return Factory(
        supernet,
        assembler,
        TaskSplit(**doc["split"]),
        list(doc["classes"]),
        str(doc.get("mask_mode", "topk")),
        float(doc.get("tau", 1.0)),
        dict(doc.get("meta") or {}),
    ).eval()


def load_supernet_file(path: str | os.PathLike) -> tuple[ModularSupernet, TaskSplit, list[str]]:
    """The supernet model file ``task=nnfactory_supernet`` wrote (its ``meta.nnfactory`` names
    the groups, the task split and the class names)."""
    _, js = pair_paths(path)
    if js.is_file():
        try:
            fmt = json.loads(js.read_text()).get("format")
        except (json.JSONDecodeError, AttributeError):
            fmt = None
        if fmt == FORMAT:
            raise ValueError(
                f"{js} is an NN-Factory factory (stage 2's output), not an NN-Factory supernet; "
                "give the supernet.json task=nnfactory_supernet wrote"
            )
    model = load_model(path)
    info = (getattr(model, "meta", None) or {}).get(META_KEY)
    if not isinstance(model, CifarResNet) or not info:
        raise ValueError(
            f"{path} is not an NN-Factory supernet (its JSON has no meta.{META_KEY}); train one "
            "with metamorph-train experiment=nnfactory/recipe/supernet_resnet20_cifar10_cpu"
        )
    return (
        ModularSupernet(model.train(), int(info["groups"])),
        TaskSplit(**info["split"]),
        list(info["classes"]),
    )


def supernet_meta(supernet: ModularSupernet, split: TaskSplit, classes) -> dict:
    return {
        META_KEY: {"groups": supernet.groups, "split": split.to_dict(), "classes": list(classes)}
    }


def state_tensors(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
