"""The modules that register the built-in tasks, checkpoint kinds, search methods and comparison
point sources.

This is the plugin pattern: :class:`~metamorph.runtime.registry.Registry` imports these modules
(by name, with :func:`importlib.import_module`) the first time a lookup misses, so the runtime
layer finds every method without importing an upper layer at import time, and the CLI names none.
A new method adds its module here (or, outside this repository, declares an entry point in the
``metamorph.plugins`` group of its own package); the import-layer test (tests/test_layers.py)
checks that every name listed exists.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

BUILTIN_PLUGINS: tuple[str, ...] = (
    "metamorph.tasks.classifier",  # task pretrain, checkpoint kind pretrain
    "metamorph.tasks.metamorph_train",  # task metamorph, checkpoint kind metamorph
    "metamorph.tasks.slimmable",  # task slimmable, checkpoint kind slimmable
    "metamorph.baselines.individual",  # task individual
    "metamorph.search.methods",  # search methods genecai, metamorph
    "metamorph.compare.sources.metamorphic",  # comparison point source metamorphic
    "metamorph.compare.sources.slimmable",  # comparison point source slimmable
    "metamorph.compare.sources.model_files",  # point sources model_files, genecai, pruning
    "metamorph.methods.nnfactory.task",  # tasks nnfactory_supernet / _assembler, their kinds
    "metamorph.methods.nnfactory.customize",  # customization method nnfactory
    "metamorph.methods.learngene.task",  # tasks learngene_aux / _stitch, their kinds
    "metamorph.methods.learngene.customize",  # customization method learngene
    "metamorph.methods.learngene.points",  # comparison point source learngene
    "metamorph.methods.bespoke.task",  # tasks bespoke_preprocess / _retrain, kind bespoke_retrain
    "metamorph.methods.bespoke.customize",  # customization method bespoke
)
ENTRY_POINT_GROUP = "metamorph.plugins"

_loaded = False


def load_plugins() -> None:
    """Import every built-in plugin module and installed ``metamorph.plugins`` entry point once."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # set first: plugin modules may look entries up while they are imported
    try:
        for name in BUILTIN_PLUGINS:
            importlib.import_module(name)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            ep.load()
    except BaseException:
        _loaded = False
        raise
