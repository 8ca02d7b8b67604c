"""The customization-method registry: ``method`` -> the function ``metamorph-customize`` runs.

A customizer turns a trained artefact, a task (a set of classes) and a device budget into a
deployable model without training: ``run(cfg) -> summary``. Registered where it is defined, e.g.
``@register_customizer("nnfactory")`` in :mod:`metamorph.methods.nnfactory.customize`, its module
listed in :data:`metamorph.runtime.plugins.BUILTIN_PLUGINS`, so Bespoke and Learngene Pool plug
in without touching the CLI.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from metamorph.runtime.registry import Registry

Customizer = Callable[[DictConfig], dict]

CUSTOMIZERS: Registry[Customizer] = Registry(
    "customization method",
    hint="choose one with method=<name>; a new method registers itself with "
    "@metamorph.runtime.customizers.register_customizer('<name>') (see docs/DESIGN.md)",
)


def register_customizer(name: str) -> Callable[[Customizer], Customizer]:
    """Decorator: register ``run(cfg) -> summary`` as the customization method ``name``."""
    return CUSTOMIZERS.decorator(name)


def get_customizer(name: str) -> Customizer:
    return CUSTOMIZERS.get(name)


def list_customizers() -> list[str]:
    return CUSTOMIZERS.names()
