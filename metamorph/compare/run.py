"""Run a comparison: collect every method's points under one setting, then write the outputs."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from metamorph.compare import device as devices
from metamorph.compare.config import ComparisonConfig
from metamorph.compare.context import Context
from metamorph.compare.points import (
    ComparisonError,
    MissingPoints,
    check_setting,
    read_points,
    write_points,
)
from metamorph.compare.registry import point_source
from metamorph.compare.report import MethodResult, markdown, plot, write_table_csv
from metamorph.config.schema import DataConfig, typed

OUTPUTS = ("comparison.csv", "comparison.md", "acc_vs_flops.png", "acc_vs_latency.png")


def build_context(data_cfg, comp: ComparisonConfig, device, seed: int, min_run_time, log):
    from metamorph.runtime.data import build_datamodule

    d: DataConfig = typed(DataConfig, data_cfg, "data")
    prof = devices.profile(comp.profile)
    dm = build_datamodule(data_cfg, seed=seed)
    return Context(dm, data_id(d), comp.split, prof, device, seed, min_run_time, log)


def data_id(d: DataConfig) -> str:
    """The data set as points record it: its name and the last part of its root
    (``cifar10/cifar10-jpeg``, ``cifar10/cifar10-mini``), the same on any checkout."""
    root = str(d.root).rstrip("/").replace(":", "/").rsplit("/", 1)[-1]
    return f"{d.name}/{root}"


def collect(comp: ComparisonConfig, ctx: Context) -> list[MethodResult]:
    """Every method's points (from its points CSV or its source), or why they are missing."""
    if not comp.methods:
        raise ComparisonError(f"comparison {comp.name!r} lists no methods")
    results = []
    for key, m in comp.methods.items():
        entry = point_source(m.source)  # unknown names fail before anything is evaluated
        label = m.label or key
        where = f"comparison.methods.{key}.args"
        opts = typed(entry.options, m.args, where) if entry.options else m.args
        res = MethodResult(key, label, m.source, cost=m.cost)
        t0 = time.time()
        try:
            if m.points and Path(m.points).is_file():
                p = Path(m.points)
                res.points = read_points(p, key)
                if not res.points:
                    raise MissingPoints(f"{p} has no points of method {key!r}")
                check_setting(res.points, ctx.setting, str(p))
                res.points_file = str(p)
            else:
                found = entry.find(opts, ctx)
                res.make_what, res.notes = found.make_what, list(found.notes)
                for cand in found.candidates:
                    q = ctx.measure(key, cand)
                    res.points.append(q)
                    ctx.log(
                        f"  {label:<24} {q.series:<10} {q.descriptor[:48]:<48} acc {q.acc:6.2f}% "
                        f"{q.flops / 1e6:7.2f} MFLOPs {q.latency_ms:7.3f} ms"
                    )
                if not res.points:
                    raise MissingPoints("its source found no networks")
                res.save_to = m.points  # evaluated because the points file is missing
        except MissingPoints as e:
            res.points, res.missing = [], str(e)
            ctx.log(f"  {label:<24} missing: {e}")
        else:
            ctx.log(f"  {label:<24} {len(res.points)} points in {time.time() - t0:.1f} s")
        results.append(res)
    return results


def write_outputs(results, ctx: Context, comp: ComparisonConfig, folder: Path) -> list[Path]:
    folder = Path(folder)
    title = f"{comp.name}: {ctx.setting.data} {ctx.setting.split} split, {comp.profile}"
    write_table_csv(results, folder / "comparison.csv")
    charts = [
        plot(results, "flops", folder / "acc_vs_flops.png", title),
        plot(results, "latency", folder / "acc_vs_latency.png", title),
    ]
    about = " ".join(
        x for x in (f"Base network: {comp.base}." if comp.base else "", comp.description) if x
    )
    md = markdown(results, ctx.setting, devices.machine_description(), title, about, charts)
    (folder / "comparison.md").write_text(md)
    pts_dir = folder / "points"
    pts_dir.mkdir(exist_ok=True)
    for r in results:
        if r.points and r.points_file is None:
            write_points(r.points, pts_dir / f"{r.key}.csv")
    return [folder / f for f in OUTPUTS]


def save_points(points, path: Path) -> Path:
    """Write a method's points file atomically (a later run reads it instead of evaluating)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_points(points, tmp)
    tmp.replace(path)
    return path


def run_comparison(cfg: DictConfig, log=print) -> dict:
    """``cfg``: ``comparison`` (a :class:`ComparisonConfig`), ``data``, ``out_dir``, ``device``,
    ``seed``, ``latency_min_run_time``. Returns the run summary."""
    from metamorph.export.outputs import StagedOutputs, check_output_dir

    t0 = time.time()
    if cfg.get("comparison") is None:
        raise ComparisonError(
            "no comparison chosen: pass comparison=<name> (a file of metamorph/conf/comparison/)"
        )
    comp: ComparisonConfig = typed(ComparisonConfig, cfg.comparison, "comparison")
    for key, m in comp.methods.items():  # fail on a typo before loading any data
        if not m.source:
            raise ComparisonError(f"comparison.methods.{key}.source is not set")
        entry = point_source(m.source)
        if entry.options:
            typed(entry.options, m.args, f"comparison.methods.{key}.args")
    out_dir = check_output_dir(Path(str(cfg.out_dir)))
    from metamorph.runtime.device import resolve_device

    ctx = build_context(
        cfg.data,
        comp,
        resolve_device(str(cfg.get("device", "auto"))),
        int(cfg.get("seed", 0)),
        None if cfg.get("latency_min_run_time") is None else float(cfg.latency_min_run_time),
        log,
    )
    s = ctx.setting
    log(
        f"[metamorph-compare] {comp.name}: {len(comp.methods)} methods on {s.data} {s.split} "
        f"({s.images} images), profile {s.profile}, machine {s.machine}"
    )
    results = collect(comp, ctx)
    with StagedOutputs(out_dir) as st:
        write_outputs(results, ctx, comp, st.path(""))
        files = [str(p) for p in st.commit()]
    for r in results:
        if r.save_to:
            files.append(str(save_points(r.points, Path(r.save_to))))
    missing = {r.key: r.missing for r in results if r.missing is not None}
    return {
        "comparison": comp.name,
        "methods": len(results),
        "points": sum(len(r.points) for r in results),
        "missing": len(missing),
        "missing_methods": missing,
        "setting": s.__dict__,
        "out_dir": str(out_dir),
        "files": sorted(files),
        "time_s": round(time.time() - t0, 1),
    }
