"""The runtime layer: what every task and tool builds a run from.

Data modules, networks, the Trainer, the device, the run summary, and the registries (tasks,
checkpoint kinds, search methods) that let a method plug in without any CLI file naming it.
It sits below every task, method and tool and imports none of them (docs/DESIGN.md).
"""

from metamorph.runtime.checkpoint_io import AtomicCheckpointIO
from metamorph.runtime.checkpoints import (
    checkpoint_kind,
    list_checkpoint_kinds,
    load_checkpoint,
    register_checkpoint_kind,
)
from metamorph.runtime.data import build_datamodule
from metamorph.runtime.device import resolve_device
from metamorph.runtime.networks import build_model, load_any_model
from metamorph.runtime.search_methods import (
    get_search_method,
    list_search_methods,
    register_search_method,
)
from metamorph.runtime.summary import plain, print_summary, report
from metamorph.runtime.tasks import get_task, list_tasks, register_task, run_task
from metamorph.runtime.trainer import build_trainer, callback_metric, instantiate_list

__all__ = [
    "AtomicCheckpointIO",
    "build_datamodule",
    "build_model",
    "build_trainer",
    "callback_metric",
    "checkpoint_kind",
    "get_search_method",
    "get_task",
    "instantiate_list",
    "list_checkpoint_kinds",
    "list_search_methods",
    "list_tasks",
    "load_any_model",
    "load_checkpoint",
    "plain",
    "print_summary",
    "register_checkpoint_kind",
    "register_search_method",
    "register_task",
    "report",
    "resolve_device",
    "run_task",
]
