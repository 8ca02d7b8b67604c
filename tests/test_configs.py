"""Every experiment file composes against its primary config and passes the typed schemas."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metamorph.config.experiments import list_experiments
from metamorph.config.schema import DataConfig, ModelConfig, OptimConfig, SchedulerConfig, typed

CONF = Path(__file__).resolve().parents[1] / "metamorph" / "conf"
EXPERIMENTS = {e.override: e for e in list_experiments(CONF)}


@pytest.mark.parametrize("override", sorted(EXPERIMENTS))
def test_experiment_composes(override):
    primary = EXPERIMENTS[override].primary
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            primary,
            overrides=[override, "paths.root_dir=/tmp", "paths.output_dir=/tmp/out"],
        )
    assert cfg.name  # run names are kept from before the regrouping (docs/EXPERIMENTS.md)
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
    assert {
        "experiment=finetune/resnet20_cifar10",
        "experiment=neumeta/paper/resnet20_cifar10",
        "experiment=neumeta/recipe/resnet20_cifar10_cpu",
        "search_experiment=genecai/paper/resnet56_cifar10",
    } <= set(EXPERIMENTS)
