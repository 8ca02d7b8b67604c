"""Comparison points, the settings every point must share, and the points CSV.

A point is one deployable network of one method, measured under the comparison's protocol:
accuracy on the data split, parameters, FLOPs and latency on the device profile of a given
machine. Points evaluated earlier (a points CSV) are accepted only if they were measured under
the same settings (:class:`Setting`); anything else is refused, never mixed into a chart.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

PROTOCOL_VERSION = "v1"


class ComparisonError(ValueError):
    """A comparison that cannot be made as configured (message says what to change)."""


class MissingPoints(Exception):
    """A method whose points cannot be found or made now; reported in the table, not dropped."""


@dataclass(frozen=True)
class Setting:
    """What makes two points comparable: the data split (name, split, image count), the device
    profile, the machine and the evaluation protocol."""

    data: str
    split: str
    images: int
    profile: str
    machine: str
    protocol: str

    def differences(self, other: Setting) -> list[str]:
        return [
            f"{f.name} {getattr(other, f.name)!r} (this comparison: {getattr(self, f.name)!r})"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def protocol_id(split: str, images: int) -> str:
    """The evaluation protocol, as one id: top-1 accuracy of the plain deployable network (the
    one whose latency is measured) on all ``images`` of ``split``."""
    return f"{PROTOCOL_VERSION}:top1-plain-network:{split}:{images}"


@dataclass
class Point:
    method: str
    series: str
    descriptor: str  # JSON: the shape / configuration of this network
    seen: bool | None  # None: one network made for this shape (no trained range)
    acc: float
    params: int
    flops: int
    latency_ms: float
    latency_iqr_ms: float
    data: str
    split: str
    images: int
    profile: str
    machine: str
    protocol: str
    artefact: str = ""  # the file the network comes from
    make_s: float | None = None  # measured seconds from that file to this network

    @property
    def setting(self) -> Setting:
        return Setting(
            self.data, self.split, self.images, self.profile, self.machine, self.protocol
        )

    def to_row(self) -> dict:
        d = asdict(self)
        d["seen"] = seen_text(self.seen)
        return d


FIELDS = [f.name for f in fields(Point)]
_INT = {"params", "flops", "images"}
_FLOAT = {"acc", "latency_ms", "latency_iqr_ms"}
OPTIONAL = {"artefact", "make_s"}


def seen_text(seen: bool | None) -> str:
    return "n/a" if seen is None else ("seen" if seen else "unseen")


def _parse(row: dict, where: str) -> Point:
    missing = [k for k in FIELDS if k not in OPTIONAL and not (row.get(k) or "").strip()]
    if missing:
        raise ComparisonError(f"{where} lacks {missing}; a points CSV needs columns {FIELDS}")
    vals: dict = {}
    for k in FIELDS:
        v = (row.get(k) or "").strip()
        try:
            if k == "make_s":
                vals[k] = float(v) if v else None
            elif k in _INT:
                vals[k] = int(float(v))
            elif k in _FLOAT:
                vals[k] = float(v)
                if not math.isfinite(vals[k]):
                    raise ValueError(v)
            elif k == "seen":
                if v not in ("seen", "unseen", "n/a"):
                    raise ValueError(v)
                vals[k] = None if v == "n/a" else v == "seen"
            else:
                vals[k] = v
        except ValueError:
            raise ComparisonError(f"{where}: {k}={v!r} is not valid") from None
    return Point(**vals)


def read_points(path: str | Path, method: str | None = None) -> list[Point]:
    """Points of a points CSV (optionally only ``method``'s)."""
    p = Path(path)
    try:
        with open(p, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ComparisonError(f"points CSV {p} cannot be read ({e})") from None
    pts = [
        _parse(r, f"{p} row {i + 2}")
        for i, r in enumerate(rows)
        if not (r.get("status") or "").startswith("missing")  # a comparison table's report rows
    ]
    return [q for q in pts if method is None or q.method == method]


def check_setting(points: list[Point], want: Setting, where: str) -> None:
    """Refuse points measured under another split, profile, machine or protocol."""
    for q in points:
        diff = want.differences(q.setting)
        if diff:
            raise ComparisonError(
                f"{where}: point {q.method}/{q.series} {q.descriptor} was measured with "
                f"{'; '.join(diff)}; points from another data split, device profile, machine "
                "or protocol cannot share a chart. Re-evaluate it here (drop the points file "
                "from the method's config) or run the comparison with that setting."
            )


def write_points(points: list[Point], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for q in points:
            w.writerow(q.to_row())


def descriptor_json(d) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"))
