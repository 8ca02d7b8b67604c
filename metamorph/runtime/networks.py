"""Plain networks of a run: built from the ``model`` config group or loaded from a file."""

from __future__ import annotations

import os

from omegaconf import DictConfig
from torch import nn

from metamorph.config.schema import ModelConfig, typed
from metamorph.models import create_model, fold_batchnorm
from metamorph.runtime.checkpoints import checkpoint_kind, load_checkpoint


def load_any_model(path: str | os.PathLike) -> nn.Module:
    """A plain network from a model file (.json/.safetensors), a foreign akamaster checkpoint
    (.th) or a ``task=pretrain`` Lightning checkpoint; other kinds are a clear error."""
    import lightning as L

    obj = load_checkpoint(path)
    if isinstance(obj, L.LightningModule) or not isinstance(obj, nn.Module):
        raise ValueError(
            f"{path} is a {checkpoint_kind(path)} checkpoint, not a plain network; pass a model "
            "file (.json), an akamaster .th or a task=pretrain checkpoint, or sample a network "
            "from it with metamorph-sample"
        )
    return obj


def build_model(cfg: DictConfig, num_classes: int | None = None) -> nn.Module:
    """``cfg.model``: a registered architecture, or the network of ``model.init`` (a file)."""
    m: ModelConfig = typed(ModelConfig, cfg, "model")
    if m.init:
        model = load_any_model(m.init)
        if num_classes is not None and model.arch.num_classes != num_classes:
            raise ValueError(
                f"{m.init} has {model.arch.num_classes} classes but the data has {num_classes}; "
                "choose a checkpoint trained on this dataset"
            )
    else:
        kwargs = dict(m.kwargs)
        if num_classes is not None:
            kwargs.setdefault("num_classes", num_classes)
        model = create_model(m.name, **kwargs)
    if m.fold_bn:
        fold_batchnorm(model.eval())
    return model
