"""Customization with Learngene Pool (or SN-Net): a device budget -> one descendant, no training.

Every descendant of a fine-tuned system was evaluated once (``<system>.descendants.json``, written
by ``task=learngene_stitch``: val and test top-1, parameters, FLOPs, latency). The customizer keeps
the descendants within the analytic limits (params, FLOPs), ranks them by their **val** accuracy
(the carve-out of the training split; the test figure is reported, never used to choose), measures
the best ones end to end on the device profile when the budget names latency or memory
(:func:`metamorph.devices.select_within_budget`) and writes the winner as a plain network: a model
file (safetensors + JSON; a CifarResNet for one member alone, a ``stitched`` network otherwise)
and ONNX. ``learngene.descendant=<id>`` exports one descendant instead. Nothing is written unless
a descendant fits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig

from metamorph.config.schema import typed
from metamorph.devices import Budget, Option, estimate_memory
from metamorph.devices import select_within_budget as select
from metamorph.io.atomic import atomic_write_text
from metamorph.io.model_file import save_model
from metamorph.methods.learngene.config import LearngeneCustomizeConfig
from metamorph.methods.learngene.pool import StitchedSystem, load_system
from metamorph.methods.learngene.task import table_path
from metamorph.runtime.customizers import register_customizer


def load_table(path) -> dict:
    p = Path(str(path))
    if not p.exists():
        raise FileNotFoundError(
            f"descendant table {p} not found: task=learngene_stitch writes it beside the system "
            "file (task.evaluate=true); or give learngene.table="
        )
    return json.loads(p.read_text())


def choose(
    system: StitchedSystem, table: dict, budget: Budget, descendant: int | None = None, log=print
) -> Option:
    """The best evaluated descendant within ``budget`` (by val accuracy), or ``descendant``."""
    rows = {int(r["id"]): r for r in table["descendants"]}
    if descendant is not None:
        system.descendant(descendant)  # a bad id fails here, naming the valid range
        if descendant not in rows:
            raise ValueError(
                f"descendant {descendant} was not evaluated (the table has ids {sorted(rows)}); "
                "re-run task=learngene_stitch with task.evaluate_ids=null"
            )
        rows = {descendant: rows[descendant]}
    options = [
        Option(r["label"], int(i), params=int(r["params"]), flops=int(r["flops"]))
        for i, r in rows.items()
    ]
    profile = budget.profile if budget.needs_device else None

    def score(within: list[Option]) -> None:
        for o in within:
            o.score = rows[o.item].get("val_acc")

    def memory(o: Option) -> float:
        return estimate_memory(system.materialize(o.item), profile.input_shape).peak_mb

    def measure(o: Option):
        log(f"  measuring {o.label} end to end on {profile.name} (fresh processes)")
        return budget.measure(system.materialize(o.item))

    def predict(o: Option) -> float:  # the table's latency (measured on its device) as the guess
        return float(rows[o.item].get("latency_ms") or 0.0)

    return select(
        options,
        budget,
        predict=predict,
        memory=memory,
        measure=measure,
        score=score,
        log=log,
        what="descendant",
        describe=lambda o: f" (val {rows[o.item].get('val_acc')}%)",
    )


@register_customizer("learngene")
def run_learngene(cfg: DictConfig) -> dict:
    """``metamorph-customize method=learngene``: see the module docstring."""
    t0 = time.perf_counter()
    lc: LearngeneCustomizeConfig = typed(
        LearngeneCustomizeConfig, cfg.get("learngene"), "learngene"
    )
    if not lc.pool:
        raise ValueError(
            "learngene.pool= is required: the system file task=learngene_stitch wrote "
            "(e.g. outputs/models/learngene/pool6.json)"
        )
    budget = Budget.from_config(cfg.get("budget"), cfg.get("device"))
    if not budget.active and lc.descendant is None:
        raise ValueError(
            "the budget sets no limit: give budget.max_flops, max_params, max_latency_ms or "
            "max_memory_mb (e.g. budget.max_flops=3e7), or learngene.descendant=<id>"
        )
    if not budget.active:
        budget = Budget(max_params=10**12, device=cfg.get("device"))
    out = Path(str(cfg.out)) if cfg.get("out") else None
    if out is None:
        raise ValueError("out= is required: the path prefix of the model files to write")
    system = load_system(lc.pool)
    table = load_table(lc.table or table_path(lc.pool))
    print(f"[metamorph-customize] learngene {lc.pool}: budget {budget.describe()}")
    best = choose(system, table, budget, lc.descendant)
    row = next(r for r in table["descendants"] if int(r["id"]) == best.item)
    net = system.materialize(best.item)
    summary = {
        "method": "learngene",
        "system": table.get("system"),
        "descendant": best.item,
        "label": best.label,
        "params": best.params,
        "flops": best.flops,
        "val_acc": row.get("val_acc"),
        "test_acc": row.get("test_acc"),
        "measured_latency_ms": None
        if best.measured is None
        else round(best.measured.latency_ms, 4),
        "budget": budget.to_dict(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)  # only now: a failed choice writes nothing
    summary["model_file"] = str(save_model(net, out, meta={"learngene": dict(summary)}))
    if lc.onnx:
        from metamorph.export.formats import export_onnx

        onnx_path = out.with_name(out.name + ".onnx")
        summary["onnx_exporter"] = export_onnx(net, onnx_path, metadata={"learngene": summary})
        summary["onnx"] = str(onnx_path)
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    report = out.with_name(out.name + ".customize.json")
    atomic_write_text(report, json.dumps(summary, indent=1, default=str))
    print(
        f"[metamorph-customize] descendant {best.item} {best.label}: {best.flops} FLOPs, "
        f"{best.params} params, val {row.get('val_acc')}% test {row.get('test_acc')}%"
    )
    return summary
