"""The registry of point sources: how each method's comparison points are found.

A method registers a function ``find(options, ctx) -> Found`` under its source name::

    @register_point_source("slimmable", options=SlimmableOptions)
    def slimmable_points(opts: SlimmableOptions, ctx: Context) -> Found: ...

``options`` is a dataclass: a comparison config's ``methods.<key>.args`` is validated against it
(a typo lists the valid keys). The function yields plain deployable networks
(:class:`Candidate`); the comparison measures every one of them the same way. It raises
:class:`~metamorph.compare.points.MissingPoints` when its artefacts are absent.

The built-in sources are found like every registry's entries: their modules are listed in
:data:`metamorph.runtime.plugins.BUILTIN_PLUGINS` and imported on the first look-up that misses;
a new method registers its source in its own package and lists that module there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from metamorph.runtime.registry import Registry


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


POINT_SOURCES: Registry[SourceEntry] = Registry(
    "point source",
    hint="register one with @register_point_source(name) (metamorph.compare.registry)",
)


def register_point_source(name: str, *, options: type | None = None):
    """Register ``find(options, ctx) -> Found`` as the point source ``name``."""

    def deco(fn: Callable[..., Found]) -> Callable[..., Found]:
        old = POINT_SOURCES._entries.get(name)
        if old is not None and old.find is fn:
            return fn  # the same module imported twice
        POINT_SOURCES.register(name, SourceEntry(name, fn, options))
        return fn

    return deco


def list_point_sources() -> list[str]:
    return POINT_SOURCES.names()


def point_source(name: str) -> SourceEntry:
    """The source ``name``; an unknown name lists the registered ones."""
    return POINT_SOURCES.get(name)
