"""The registry of point sources: how each method's comparison points are found.

A method registers a function ``find(options, ctx) -> Found`` under its source name::

    @register_point_source("slimmable", options=SlimmableOptions)
    def slimmable_points(opts: SlimmableOptions, ctx: Context) -> Found: ...

``options`` is a dataclass: a comparison config's ``methods.<key>.args`` is validated against it
(a typo lists the valid keys). The function yields plain deployable networks
(:class:`Candidate`); the comparison measures every one of them the same way. It raises
:class:`~metamorph.compare.points.MissingPoints` when its artefacts are absent.

The built-in sources live in :data:`BUILTIN_MODULES`, imported on the first look-up (the plugin
pattern: a method's issue adds its module there, or registers from its own package).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

BUILTIN_MODULES = (
    "metamorph.compare.sources.metamorphic",
    "metamorph.compare.sources.slimmable",
    "metamorph.compare.sources.model_files",
)


@dataclass
class Candidate:
    """One network of a method, before it is measured."""

    series: str
    descriptor: Any  # JSON-serialisable: the shape / configuration
    model: nn.Module  # the plain deployable network (eval mode)
    seen: bool | None = None  # None: a network made for this shape alone
    make_s: float | None = None  # measured seconds to make it from the method's artefact
    artefact: str = ""  # the file it comes from (its size counts as the method's storage)


@dataclass
class Found:
    """What a source found: the candidates (an iterable, so only one network needs to be in
    memory at a time), what their ``make_s`` measures and notes on how they were made."""

    candidates: Iterable[Candidate]
    make_what: str = ""  # what Candidate.make_s measures, e.g. "emission + BN fold"
    notes: list[str] = field(default_factory=list)


@dataclass
class SourceEntry:
    name: str
    find: Callable[..., Found]
    options: type | None


_SOURCES: dict[str, SourceEntry] = {}
_loaded = False


def register_point_source(name: str, *, options: type | None = None):
    """Register ``find(options, ctx) -> Found`` as the point source ``name``."""

    def deco(fn: Callable[..., Found]) -> Callable[..., Found]:
        if name in _SOURCES and _SOURCES[name].find is not fn:
            raise ValueError(f"point source {name!r} is already registered")
        _SOURCES[name] = SourceEntry(name, fn, options)
        return fn

    return deco


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)


def list_point_sources() -> list[str]:
    _load_builtins()
    return sorted(_SOURCES)


def point_source(name: str) -> SourceEntry:
    _load_builtins()
    try:
        return _SOURCES[name]
    except KeyError:
        raise ValueError(
            f"unknown point source {name!r}; registered sources: {', '.join(list_point_sources())}"
        ) from None
