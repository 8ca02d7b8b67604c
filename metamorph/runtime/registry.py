"""A name -> object registry whose built-in entries are found without importing them by hand.

Every registry (tasks, checkpoint kinds, search methods) is a :class:`Registry`. An entry is
registered where it is defined (``@register_task("metamorph")`` in the task's module); a lookup
that misses first imports the declared plugin modules (:mod:`metamorph.runtime.plugins`), so the
CLI never names a method and lower layers never import upper ones at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from metamorph.runtime.plugins import load_plugins

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind (``what``: "task", "checkpoint kind", ...), keyed by name."""

    def __init__(self, what: str, hint: str = "") -> None:
        self.what = what
        self.hint = hint  # how to add one, appended to unknown-name errors
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.what} needs a non-empty string name, got {name!r}")
        old = self._entries.get(name)
        if old is not None and old is not obj:
            raise ValueError(f"{self.what} {name!r} is already registered ({_where(old)})")
        self._entries[name] = obj
        return obj

    def decorator(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            return self.register(name, obj)

        return wrap

    def get(self, name: str) -> T:
        """The entry ``name``; unknown names raise ``ValueError`` listing the known ones."""
        if name not in self._entries:
            load_plugins()
        if name not in self._entries:
            known = ", ".join(self.names()) or "none"
            raise ValueError(
                f"unknown {self.what} {name!r}; known: {known}"
                + (f". {self.hint}" if self.hint else "")
            )
        return self._entries[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        load_plugins()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: str) -> bool:
        if name not in self._entries:
            load_plugins()
        return name in self._entries


def _where(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
