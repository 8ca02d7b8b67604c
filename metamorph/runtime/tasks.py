"""The task registry: ``task.name`` -> the function that runs it (``metamorph-train``'s dispatch).

A task is a function ``run(cfg: DictConfig) -> dict`` (the run summary) registered where it is
defined, e.g. ``@register_task("slimmable")`` in :mod:`metamorph.tasks.slimmable`; the module is
listed in :data:`metamorph.runtime.plugins.BUILTIN_PLUGINS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from metamorph.runtime.registry import Registry

TaskRunner = Callable[[DictConfig], dict]

TASKS: Registry[TaskRunner] = Registry(
    "task",
    hint="choose one with task=<name>; a new task registers itself with "
    "@metamorph.runtime.tasks.register_task('<name>') (see docs/DESIGN.md)",
)


def register_task(name: str) -> Callable[[TaskRunner], TaskRunner]:
    """Decorator: register ``run(cfg) -> summary`` as the task ``name``."""
    return TASKS.decorator(name)


def get_task(name: str) -> TaskRunner:
    return TASKS.get(name)


def list_tasks() -> list[str]:
    return TASKS.names()


def run_task(cfg: DictConfig) -> dict:
    """Run the task named by ``cfg.task.name``; returns its summary. ``export_to``'s folder is
    made before the task starts (every task writes its result there at the end: a missing
    folder must not cost the run), and a path that cannot be a folder fails before any work."""
    fn = get_task(str(cfg.task.name))
    export_to = cfg.get("export_to")
    if export_to:
        parent = Path(str(export_to)).parent
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"export_to={export_to}: {parent} is a file, not a folder")
        parent.mkdir(parents=True, exist_ok=True)
    return fn(cfg)
