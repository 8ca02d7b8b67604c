"""The search-method registry: ``search.method`` -> the object that runs its search phases.

A search method (:class:`SearchMethod`) checks its settings (``validate``), loads what it
searches over from the config (``load_source``) and runs its phases on a search set
(``run_phases``); :mod:`metamorph.search`'s
pipeline does the shared rest (CSV, front models, baselines, plot). Registered where it is
defined, e.g. ``@register_search_method("genecai")`` in :mod:`metamorph.search.methods`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from metamorph.runtime.registry import Registry


class SearchMethod(Protocol):
    def validate(self, scfg) -> None:
        """Refuse settings of the ``search`` group this method cannot run (phases, baseline)."""

    def load_source(self, cfg) -> Any:
        """What the method searches over (a network, a metamorphic module), from the run config.
        The object has ``arch`` (its :class:`~metamorph.models.ResNetArch`) and ``label``."""

    def run_phases(self, source, scfg, ctx) -> Any:
        """Run the search phases; returns the pipeline's phase outcome."""


SEARCH_METHODS: Registry[SearchMethod] = Registry(
    "search method",
    hint="choose one with search.method=<name>; a new method registers itself with "
    "@metamorph.runtime.search_methods.register_search_method('<name>') (see docs/DESIGN.md)",
)


def register_search_method(name: str) -> Callable[[type], type]:
    """Class decorator: register an instance of the decorated class as search method ``name``."""

    def wrap(cls: type) -> type:
        SEARCH_METHODS.register(name, cls())
        return cls

    return wrap


def get_search_method(name: str) -> SearchMethod:
    return SEARCH_METHODS.get(name)


def list_search_methods() -> list[str]:
    return SEARCH_METHODS.names()
