"""Every import in the package respects the layer order of :data:`metamorph.layers.LAYERS`.

The walk covers module-level and function-level (lazy) imports alike, so a cycle cannot hide
behind a deferred import."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import metamorph
from metamorph.layers import LAYERS
from metamorph.runtime.plugins import BUILTIN_PLUGINS

PKG = Path(metamorph.__file__).resolve().parent


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["metamorph", *parts])


def part_of(name: str) -> str:
    """The LAYERS key of module ``metamorph.a.b...``: the longest matching key."""
    rest = name.split(".")[1:]
    for n in range(len(rest), 0, -1):
        key = ".".join(rest[:n])
        if key in LAYERS:
            return key
    if len(rest) <= 1:
        return ""  # a root module (metamorph/__init__.py, metamorph/api.py if not listed)
    raise KeyError(rest[0])


def imports_in(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every metamorph import in module ``name``'s source,
    function-level (lazy) and relative ones included."""
    package = name if is_package else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            else:
                base = node.module or ""
            if base == "metamorph":  # from metamorph import x: x may be a subpackage
                out += [(node.lineno, f"metamorph.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
    return [(ln, m) for ln, m in out if m == "metamorph" or m.startswith("metamorph.")]


def imports_of(path: Path) -> list[tuple[int, str]]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def package_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "conf" not in p.relative_to(PKG).parts)


def test_every_part_has_a_rank():
    missing = set()
    for path in package_files():
        try:
            part_of(module_name(path))
        except KeyError as e:
            missing.add(str(e))
    assert not missing, f"add {sorted(missing)} to metamorph/layers.py LAYERS (see docs/DESIGN.md)"


def test_imports_follow_the_layer_order():
    bad = []
    for path in package_files():
        src = part_of(module_name(path))
        for line, mod in imports_of(path):
            if mod == "metamorph":
                dst = ""
            else:
                try:
                    dst = part_of(mod)
                except KeyError:
                    continue  # reported by test_every_part_has_a_rank
            if dst != src and LAYERS[dst] >= LAYERS[src]:
                bad.append(
                    f"{path.relative_to(PKG.parent)}:{line} imports {mod} "
                    f"({dst or 'metamorph'}, rank {LAYERS[dst]}) from {src or 'metamorph'} "
                    f"(rank {LAYERS[src]})"
                )
    assert not bad, "imports against the layer order (metamorph/layers.py):\n" + "\n".join(bad)


def test_the_walk_sees_lazy_and_relative_imports():
    """The checker itself: function-level, relative and ``from metamorph import`` imports are
    all found, and an upward one is against the order."""
    src = (
        "from . import sibling\n"
        "from ..models import create_model\n"
        "def f():\n"
        "    from metamorph.cli.train import run\n"
        "    from metamorph import runtime\n"
    )
    assert imports_in(src, "metamorph.utils.probe") == [
        (1, "metamorph.utils"),
        (2, "metamorph.models"),
        (4, "metamorph.cli.train"),
        (5, "metamorph.runtime"),
    ]
    assert LAYERS[part_of("metamorph.cli.train")] > LAYERS[part_of("metamorph.utils.probe")]
    assert part_of("metamorph.export.formats") == "export.formats"
    assert part_of("metamorph.export.sample") == "export"


@pytest.mark.parametrize("name", BUILTIN_PLUGINS)
def test_plugins_are_upper_layer_modules(name):
    """The registries' lazily imported plugin modules exist and sit above the runtime layer."""
    assert importlib.util.find_spec(name) is not None, f"{name} in BUILTIN_PLUGINS does not exist"
    assert LAYERS[part_of(name)] > LAYERS["runtime"]


def test_design_note_states_the_same_ranks():
    """docs/DESIGN.md's layer table says what LAYERS enforces (its "root" row is the "" key)."""
    import re

    doc = (PKG.parent / "docs" / "DESIGN.md").read_text()
    stated = {}
    for rank, parts in re.findall(r"^\| *(\d+) *\| *(.+?) *\|", doc, re.M):
        keys = [""] if parts.startswith("root") else re.findall(r"`([\w.]+)`", parts)
        stated.update(dict.fromkeys(keys, int(rank)))
    assert stated == LAYERS
