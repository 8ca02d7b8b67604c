"""Every experiment file composes against its primary config and passes the typed schemas."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metamorph.config.schema import DataConfig, ModelConfig, OptimConfig, SchedulerConfig, typed

CONF = Path(__file__).resolve().parents[1] / "metamorph" / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SEARCH = {e for e in EXPERIMENTS if e.startswith("genecai_")}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    primary = "search" if name in SEARCH else "train"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            primary,
            overrides=[f"experiment={name}", "paths.root_dir=/tmp", "paths.output_dir=/tmp/out"],
        )
    assert cfg.name == name or name.startswith(("individual_", "genecai_"))
    if primary == "train":
        typed(DataConfig, cfg.data, "data")
        typed(ModelConfig, cfg.model, "model")
        if cfg.task.name in ("pretrain", "metamorph"):
            typed(OptimConfig, cfg.task.optim, "task.optim")
            typed(SchedulerConfig, cfg.task.scheduler, "task.scheduler")
        if cfg.task.name == "metamorph":
            from metamorph.tasks.metamorph_train import metamorph_config

            mcfg = metamorph_config(cfg)
            assert mcfg.spec.blocks
        OmegaConf.to_container(cfg.trainer, resolve=True)


def test_experiment_list_is_not_empty():
    assert {"finetune_resnet20", "neumeta_resnet20_cifar10", "neumeta_resnet20_cifar10_cpu"} <= set(
        EXPERIMENTS
    )
