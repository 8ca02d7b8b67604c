"""Dataclass schemas for the config groups; :func:`typed` validates a group against one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str = "embedded:cifar10-mini"
    download: bool = False
    cache_dir: str | None = None
    val_size: int = 5000
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0
    augment: bool = True
    train_subset: int | None = None
    test_subset: int | None = None


@dataclass
class ModelConfig:
    name: str = "resnet20"
    kwargs: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # a metamorph model file (.json/.safetensors) or an akamaster .th
    fold_bn: bool = False


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # none | cosine | onecycle | multistep | warmup_cosine
    warmup_epochs: float = 0.0
    pct_start: float = 0.15
    min_lr: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    div_factor: float = 25.0
    final_div_factor: float = 1e4


def typed(schema: type, cfg: DictConfig | dict | None, where: str) -> Any:
    """Merge ``cfg`` into ``schema`` and return the dataclass instance.

    Unknown keys and wrong types raise ``ValueError`` naming the config group and the fix.
    """
    base = OmegaConf.structured(schema)
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    try:
        merged = OmegaConf.merge(base, cfg if cfg is not None else {})
    except (ConfigKeyError, ValidationError) as e:
        known = ", ".join(f.name for f in schema.__dataclass_fields__.values())
        raise ValueError(
            f"invalid config `{where}`: {e.msg if hasattr(e, 'msg') else e}. Valid keys: {known}"
        ) from None
    return OmegaConf.to_object(merged)
