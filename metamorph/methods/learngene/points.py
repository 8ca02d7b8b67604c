"""The comparison's point source ``learngene``: every descendant of a stitched system (a
Learngene pool or SN-Net) as a plain network, measured by ``metamorph-compare`` like every
other method's networks. Each descendant is one configuration of the shared pool, so the
points carry no seen/unseen flag; ``make_s`` is the time to materialize it from the system."""

from __future__ import annotations

import time
from dataclasses import dataclass

from metamorph.compare.registry import Candidate, Found, register_point_source
from metamorph.methods.learngene.pool import load_system


@dataclass
class LearngenePointsOptions:
    system: str = ""  # the system file task=learngene_stitch wrote (<run>/system.json, export_to)
    ids: list[int] | None = None  # descendant ids (null: every one)
    series: str = ""  # the series label ("": the system's members joined, e.g. tiny6+base6)
    remake: str = ""  # the command that makes the system file (quoted when it is missing)


@register_point_source("learngene", options=LearngenePointsOptions)
def learngene_points(opts: LearngenePointsOptions, ctx) -> Found:
    path = ctx.require(opts.system, "stitched system file", opts.remake)
    system = load_system(path)
    ids = [d.id for d in system.descendants] if opts.ids is None else [int(i) for i in opts.ids]
    for i in ids:
        system.descendant(i)  # a bad id fails before any measurement, naming the valid range
    series = opts.series or "+".join(system.names)

    def candidates():
        for i in ids:
            t = time.perf_counter()
            net = system.materialize(i).eval()
            label = system.descendant(i).label(system.names)
            yield Candidate(
                series,
                {"descendant": i, "label": label},
                net,
                make_s=time.perf_counter() - t,
                artefact=str(path),
            )

    return Found(candidates(), make_what="the descendant materialized from the system file")
