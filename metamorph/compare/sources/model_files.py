"""Points of plain model files: individually fine-tuned networks, GeneCAI fronts (and their
uniform-L1 baselines), and L1 pruning without fine-tuning of a base network.

Each network was made for its own shape, so these points carry no seen/unseen flag.
"""

from __future__ import annotations

import csv
import glob
import time
from dataclasses import dataclass, field
from pathlib import Path

from metamorph.compare.points import MissingPoints
from metamorph.compare.registry import Candidate, Found, register_point_source


def _descriptor(model, path: Path, extra: dict | None = None) -> dict:
    """Hidden widths (of a ResNet), and the Tucker-2 ranks of a low-rank model file (kept in its
    JSON); a network of another family (a stitched descendant, a ViT) is described by its file."""
    from metamorph.io.model_file import read_model_json

    hidden = getattr(getattr(model, "arch", None), "hidden", None)
    d = {"hidden": hidden} if hidden is not None else {}
    lowrank = read_model_json(path).get("arch", {}).get("lowrank")
    if lowrank:
        d["lowrank"] = lowrank
    return {**d, **(extra or {})}


def _load(path: Path):
    from metamorph.io.model_file import load_model

    return load_model(path).eval()


@dataclass
class ModelFilesOptions:
    files: list[str] = field(default_factory=list)  # model files (.json) or glob patterns
    series: str = "fine-tuned"
    remake: str = ""


@register_point_source("model_files", options=ModelFilesOptions)
def model_file_points(opts: ModelFilesOptions, ctx) -> Found:
    """One point per model file (e.g. the individually fine-tuned networks)."""
    paths: list[Path] = []
    absent = []
    for pattern in opts.files:
        hits = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        found = [Path(h) for h in hits if Path(h).exists()]
        paths += found
        if not found:
            absent.append(pattern)
    if absent:
        how = f"; make them with: {opts.remake}" if opts.remake else ""
        raise MissingPoints(f"model file(s) {', '.join(absent)} not found{how}")
    if not paths:
        raise MissingPoints("no model files configured (args.files)")

    def candidates():
        for p in paths:
            model = _load(p)
            yield Candidate(
                opts.series, _descriptor(model, p, {"file": p.stem}), model, artefact=str(p)
            )

    return Found(candidates())


@dataclass
class GeneCAIOptions:
    run_dir: str = ""  # a metamorph-search output folder (front.csv, baseline.csv, models/)
    baselines: bool = True  # also the uniform-L1 baselines of baseline.csv
    remake: str = ""


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _model_path(row: dict, run_dir: Path) -> Path:
    p = Path(row.get("model_file") or "")
    if p.name and p.exists():
        return p
    local = run_dir / "models" / f"{row['name']}.json"  # the run folder was moved
    if local.exists():
        return local
    raise MissingPoints(f"model file of {row['name']} ({p or local}) not found")


@register_point_source("genecai", options=GeneCAIOptions)
def genecai_points(opts: GeneCAIOptions, ctx) -> Found:
    """The fine-tuned front of a GeneCAI search (``front.csv``) and, with ``baselines``, the
    uniform-L1 networks fine-tuned the same way at matched FLOPs (``baseline.csv``)."""
    run = ctx.require(opts.run_dir, "GeneCAI search folder", opts.remake)
    front = ctx.require(run / "front.csv", "GeneCAI front", opts.remake)
    tables = [("front", _rows(front))]
    if opts.baselines and (run / "baseline.csv").exists():
        tables.append(("uniform L1 + fine-tune", _rows(run / "baseline.csv")))
    items = [(series, r, _model_path(r, run)) for series, rows in tables for r in rows]
    if not items:
        raise MissingPoints(f"{front} has no networks")

    def candidates():
        for series, row, p in items:
            model = _load(p)
            extra = {"name": row["name"], "flops_ratio": float(row["flops_ratio"])}
            yield Candidate(series, _descriptor(model, p, extra), model, artefact=str(p))

    return Found(candidates())


@dataclass
class PruningOptions:
    base: str = ""  # the model file that is pruned
    blocks: list[str] = field(default_factory=lambda: ["layer3.2"])  # or ["all"]
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    criterion: str = "l1"  # a data-free criterion: l1 | l2 | random
    remake: str = ""


@register_point_source("pruning", options=PruningOptions)
def pruning_points(opts: PruningOptions, ctx) -> Found:
    """Structured pruning of the base network's hidden channels to each ratio, without
    fine-tuning (NeuMeta's pruning baseline), timed from base network to pruned network."""
    from metamorph.baselines.pruning import (
        CRITERIA,
        NEEDS_DATA,
        prune_to_shape,
        resolve_blocks,
        shape_for_gamma,
    )

    if opts.criterion not in CRITERIA or opts.criterion in NEEDS_DATA:
        free = [c for c in CRITERIA if c not in NEEDS_DATA]
        raise ValueError(f"pruning criterion {opts.criterion!r}: choose one of {free}")
    path = ctx.require(opts.base, "base model file", opts.remake)
    base = _load(path)
    blocks = resolve_blocks(base.arch, opts.blocks)

    def candidates():
        for g in opts.gammas:
            hidden = shape_for_gamma(base.arch, blocks, float(g))
            t0 = time.perf_counter()
            net = prune_to_shape(base, hidden, opts.criterion, blocks=blocks, seed=ctx.seed)
            dt = time.perf_counter() - t0
            yield Candidate(
                f"{opts.criterion} pruned",
                {"gamma": float(g), "hidden": hidden, "blocks": blocks},
                net.eval(),
                make_s=dt,
                artefact=str(path),
            )

    return Found(candidates(), make_what="pruning (no data)")
