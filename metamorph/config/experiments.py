"""The shipped experiment files and the header each one carries.

Experiments live in two config groups, one per primary config: ``experiment/`` (``metamorph-train``
and ``python -m metamorph.baselines.individual``) and ``search_experiment/`` (``metamorph-search``),
laid out as ``<method>/<role dir>/<name>.yaml`` (``quickstart/`` and ``finetune/`` have no role
dir). Every file opens with a header of ``# key: value`` lines under ``# @package _global_``::

    # role: recipe | paper-row | ablation | setup | diagnostic
    # primary: train | search
    # cost: <measured cost, with its date> | not measured ...
    # result: <measured headline> | not measured ... | see docs/...
    # purpose: <one line>
    # was: <old name> [overrides]      (optional: the name before the regrouping, 2026-12)

The header is data: ``scripts/experiments_index.py`` writes docs/EXPERIMENTS.md from it,
``scripts/check_experiment_renames.py`` proves each renamed file composes as its old name did,
and tests/test_experiments.py checks the headers and the inheritance rules (a recipe is at most
two files deep; an ablation is a child of a recipe that states only its change).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from metamorph.config.locations import CONF_DIR

GROUPS = {"experiment": "train", "search_experiment": "search"}  # group -> primary config
ROLES = ("paper-row", "recipe", "ablation", "setup", "diagnostic")
REQUIRED = ("role", "primary", "cost", "result", "purpose")
OPTIONAL = ("was",)
_HEADER = re.compile(r"^# ([a-z]+): (.+)$")


@dataclass
class Experiment:
    """One experiment file: its group, its name within the group and its header."""

    group: str  # "experiment" or "search_experiment"
    name: str  # e.g. "full_network/recipe/keepbn_sandwich_sgdconv_resnet20_cifar10_cpu"
    path: Path
    header: dict[str, str]
    parents: list[str] = field(default_factory=list)  # experiment names it inherits (same group)
    body: dict = field(default_factory=dict)  # the file's own keys (without ``defaults``)

    @property
    def primary(self) -> str:
        return GROUPS[self.group]

    @property
    def override(self) -> str:
        """The command-line choice that selects it, e.g. ``experiment=finetune/resnet20_cifar10``."""
        return f"{self.group}={self.name}"

    @property
    def was(self) -> tuple[str, list[str]]:
        """The old name and the overrides under which it composed as this file does."""
        parts = self.header.get("was", "").split()
        return (parts[0], parts[1:]) if parts else ("", [])


def read_header(path: Path) -> dict[str, str]:
    """The ``# key: value`` lines of the leading comment block (first value of a key wins)."""
    header: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        m = _HEADER.match(line)
        if m and m.group(1) in REQUIRED + OPTIONAL:
            header.setdefault(m.group(1), m.group(2).strip())
    return header


def _parents(group: str, defaults: list) -> list[str]:
    prefix = f"/{group}/"
    return [d[len(prefix) :] for d in defaults if isinstance(d, str) and d.startswith(prefix)]


def list_experiments(conf_dir: str | Path = CONF_DIR) -> list[Experiment]:
    """Every experiment file of every group, sorted by group and name."""
    out = []
    for group in GROUPS:
        root = Path(conf_dir) / group
        for path in sorted(root.rglob("*.yaml")):
            raw = yaml.safe_load(path.read_text()) or {}
            defaults = raw.pop("defaults", []) or []
            name = path.relative_to(root).with_suffix("").as_posix()
            out.append(
                Experiment(group, name, path, read_header(path), _parents(group, defaults), raw)
            )
    return out


def renames(conf_dir: str | Path = CONF_DIR) -> dict[str, str]:
    """Old experiment name -> the ``group=name`` override that replaces it (files whose ``was``
    carries overrides are new settings derived from an old one, not renames)."""
    return {e.was[0]: e.override for e in list_experiments(conf_dir) if e.was[0] and not e.was[1]}


def depth(exp: Experiment, by_name: dict[str, Experiment]) -> int:
    """Files in the inheritance chain, this one included (a file without parents is 1)."""
    return 1 + max((depth(by_name[p], by_name) for p in exp.parents), default=0)


def renamed_hint(overrides: list[str], conf_dir: str | Path = CONF_DIR) -> str | None:
    """For a command line that picks an experiment by its pre-2026-12 name, the line that says
    what to write instead (``None`` when no override uses an old name). For entry points to print
    before Hydra's bare "Could not find 'experiment/<old>'"."""
    table = renames(conf_dir)
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in GROUPS and value in table:
            return (
                f"experiment '{value}' was renamed: use {table[value]} "
                "(old and new names: docs/EXPERIMENTS.md)"
            )
    return None
