"""Every method on one chart: comparison points from each method's artefacts, one protocol.

``metamorph-compare comparison=<name>`` collects each method's points through its registered
point source (:func:`register_point_source`), measures every network the same way (accuracy on
the split, parameters, FLOPs, latency on one device profile) and writes a table, two charts and a
cost table. Points from another split, profile or machine are refused.
"""

from metamorph.compare.points import (
    ComparisonError,
    MissingPoints,
    Point,
    Setting,
    read_points,
    write_points,
)
from metamorph.compare.registry import (
    Candidate,
    Found,
    list_point_sources,
    point_source,
    register_point_source,
)
from metamorph.compare.run import run_comparison

__all__ = [
    "Candidate",
    "ComparisonError",
    "Found",
    "MissingPoints",
    "Point",
    "Setting",
    "list_point_sources",
    "point_source",
    "read_points",
    "register_point_source",
    "run_comparison",
    "write_points",
]
