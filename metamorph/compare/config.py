"""Typed schemas of ``metamorph-compare``'s config: the comparison and its methods.

A comparison (``metamorph/conf/comparison/<name>.yaml``) names its base network, data split and
device profile, and lists its methods: each one the point source that finds its points, the
source's ``args`` (validated by the source's own options dataclass), optionally a points CSV
evaluated earlier, and its cost figures with where they come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CostConfig:
    """One-time and per-target costs quoted from the method's records (never estimated here).

    ``source`` says where the figures come from (a docs section, a run's summary) and is
    required as soon as any figure is given."""

    one_time_hours: float | None = None  # wall-clock hours to make the method's artefact(s)
    one_time_on: str = ""  # the hardware of that figure, e.g. "2-core CPU"
    new_target_s: float | None = None  # seconds to a model for a new target, where not measured
    new_target_what: str = ""  # what that time covers, e.g. "L1 prune + 3-epoch fine-tune"
    source: str = ""

    def __post_init__(self) -> None:
        given = self.one_time_hours is not None or self.new_target_s is not None
        if given and not self.source.strip():
            raise ValueError(
                "a cost figure needs cost.source: where the figure comes from "
                "(e.g. 'docs/RESULTS.md section 5, fit 2,010 s')"
            )


@dataclass
class MethodConfig:
    source: str = ""  # a registered point source (metamorph.compare.list_point_sources())
    label: str = ""  # legend and table label (default: the method's key)
    args: dict[str, Any] = field(default_factory=dict)  # the source's options
    # a points CSV: read instead of the source when it exists (refused if measured under
    # another setting), else the source's points are evaluated and written there
    points: str | None = None
    cost: CostConfig = field(default_factory=CostConfig)


@dataclass
class ComparisonConfig:
    name: str = ""
    base: str = ""  # the base network the methods start from, e.g. resnet20
    split: str = "test"  # train | val | test
    profile: str = "cpu1_b1"  # the device profile every latency is measured on
    description: str = ""
    methods: dict[str, MethodConfig] = field(default_factory=dict)
