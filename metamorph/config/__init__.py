"""Typed schemas behind the Hydra YAML configs: a typo or a wrong type fails loudly."""

from metamorph.config.schema import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    SchedulerConfig,
    typed,
)

__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "SchedulerConfig", "typed"]
