#!/usr/bin/env python
"""NN-Factory's evaluation (issue 23): the fixed seen and unseen tasks x latency budgets, beside
its baselines, in one table.

Methods (``--methods``, run in this order, each row appended to ``<out>/rows.jsonl`` as soon as
it is measured, so a rerun skips what is there and a killed run loses one row at most):

- ``nnfactory``: the customization of ``metamorph-customize method=nnfactory`` (its defaults);
- ``nnfactory_bn``: the same with the BN statistics re-estimated per assembly (``bn_images``);
- ``random``: random masks at NN-Factory's chosen sparsity (then sparser), same search;
- ``agnostic``: G with the task input zeroed, ranked on every class: one network per budget;
- ``tp``: the full network pruned by Torch-Pruning (uniform hidden widths) to the budget;
- ``tp_ft``: ``tp`` fine-tuned on the task (``finetune_steps``; the first ``finetune_tasks``
  seen and unseen tasks only);
- ``ft_r56`` / ``ft_r20``: the pretrained network itself (``base``, or the first existing file of
  ``ft_r20``), classifier cut to the task and fine-tuned like ``tp_ft`` (same steps, same tasks),
  unpruned: reported at its measured latency, ``violation`` where that is over a budget. One
  fine-tune and one measurement per task serve every budget; ``wall_s`` is the fine-tune plus
  the measurement, its per-task cost.

Budgets are fractions of the full network's latency on the profile (``full_latency_ms``).
Accuracy: the task's test images (all of them), logits restricted to the task. Latency: the
chosen network measured end to end on the profile (``violation``: over the budget). ``wall_s``:
the whole procedure of one row (search, ranking, extraction, measurement; pruning and
fine-tuning for the baselines), the test evaluation excluded.

    OMP_NUM_THREADS=1 python scripts/nnfactory_eval.py --out outputs/nnfactory_eval
    OMP_NUM_THREADS=1 python scripts/nnfactory_eval.py --methods tp tp_ft --budgets 0.5
    OMP_NUM_THREADS=1 python scripts/nnfactory_eval.py --methods ft_r56 ft_r20 --finetune-tasks 2

Writes ``<out>/rows.jsonl``, ``<out>/table.md`` / ``table.csv`` (per method and budget: seen and
unseen accuracy, the gap, measured latency, violations, wall time) and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("nnfactory", "nnfactory_bn", "random", "agnostic", "tp", "tp_ft", "ft_r56", "ft_r20")
# the methods that need no factory (the full network and its pruned / fine-tuned versions)
NO_FACTORY = {"tp", "tp_ft", "ft_r56", "ft_r20"}


def _key(r: dict) -> tuple:
    return (r["method"], tuple(r["task"]), float(r["budget_frac"]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "scripts" / "nnfactory_eval.yaml"))
    ap.add_argument("--out", default="outputs/nnfactory_eval")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--budgets", nargs="*", type=float, default=None, help="fractions to run")
    ap.add_argument("--tasks", type=int, default=0, help="first N seen and N unseen (0: all)")
    ap.add_argument(
        "--finetune-tasks",
        type=int,
        default=None,
        help="tp_ft / ft_r56 / ft_r20 fine-tune only the first N seen and N unseen tasks "
        "(0: all; default: the config's finetune_tasks)",
    )
    ap.add_argument("--table-only", action="store_true", help="only rewrite the table")
    ap.add_argument(
        "--check",
        choices=("absolute", "ratio"),
        default="absolute",
        help="end-to-end latency check: absolute ms against fractions of the full network's "
        "measured latency (an idle machine; metamorph-customize's check), or the ratio to the "
        "full network measured right after each candidate, budgets as fractions of its predicted "
        "latency (a shared machine)",
    )
    args = ap.parse_args(argv)
    conf = yaml.safe_load(Path(args.config).read_text())
    if args.finetune_tasks is not None:
        if args.finetune_tasks < 0:
            raise ValueError(f"--finetune-tasks {args.finetune_tasks} must be >= 0")
        conf["finetune_tasks"] = args.finetune_tasks
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = (
        [json.loads(line) for line in rows_path.read_text().splitlines()]
        if rows_path.exists()
        else []
    )
    if not args.table_only:
        run(conf, args, rows, rows_path)
    return write_table(rows, out)


def run(conf: dict, args, rows: list[dict], rows_path: Path) -> None:
    torch.set_num_threads(1)
    from metamorph.baselines.pruning import shape_for_gamma
    from metamorph.data import CIFARDataModule
    from metamorph.devices import Budget, BudgetError, LatencyPredictor, Option, measure_model
    from metamorph.methods.nnfactory import baselines as bl
    from metamorph.methods.nnfactory.class_tasks import parse_task, task_names
    from metamorph.methods.nnfactory.customize import _proxy_set, customize
    from metamorph.methods.nnfactory.evaluation import TestSplit
    from metamorph.methods.nnfactory.factory import load_factory
    from metamorph.methods.nnfactory.supernet import arch_costs, channel_groups
    from metamorph.models.subnet import hidden_arch
    from metamorph.runtime.networks import load_any_model

    done = {_key(r) for r in rows}
    factory = load_factory(conf["factory"]) if set(args.methods) - NO_FACTORY else None
    base = load_any_model(conf["base"])
    # the unpruned networks fine-tuned per task: (path, network)
    sources = {}
    if "ft_r56" in args.methods:
        sources["ft_r56"] = (conf["base"], base)
    if "ft_r20" in args.methods:
        paths = conf.get("ft_r20") or []
        found = [p for p in paths if Path(p).exists()]
        if not found:
            raise FileNotFoundError(f"ft_r20: none of the config's ft_r20 files exists: {paths}")
        net = load_any_model(found[0])
        if (tuple(net.arch.mean), tuple(net.arch.std)) != (
            tuple(base.arch.mean),
            tuple(base.arch.std),
        ):
            raise ValueError(
                f"{found[0]} normalizes its input unlike {conf['base']} (mean/std "
                f"{net.arch.mean}/{net.arch.std} vs {base.arch.mean}/{base.arch.std}); the test "
                "split is transformed once with the base's"
            )
        sources["ft_r20"] = (found[0], net)
        print(f"ft_r20: {found[0]}")
    dm = CIFARDataModule(
        root=conf["data_root"], name="cifar10", val_size=1000, seed=int(conf["seed"])
    )
    dm.setup("fit")
    dm.set_normalization(base.arch.mean, base.arch.std)
    test = TestSplit.from_datamodule(dm)
    seed = int(conf["seed"])
    split = factory.split if factory is not None else None
    n = args.tasks or None
    tasks = [(parse_task(t), True) for t in conf["seen"][:n]] + [
        (parse_task(t), False) for t in conf["unseen"][:n]
    ]
    if split is not None:
        for t, seen in tasks:
            if split.is_seen(t) != seen:
                raise ValueError(
                    f"task {task_names(t)} is not {'seen' if seen else 'unseen'} in the factory's split"
                )
    fracs = [f for f in conf["budget_fracs"] if args.budgets is None or f in args.budgets]
    sparsities = [round(0.05 * i, 2) for i in range(19)]
    # the predictor's table and the full network's latency are measured by this evaluation
    # (kept in <out>), so every budget and prediction comes from the same machine state
    profile = Budget(max_latency_ms=1.0, device=conf["device"]).profile
    predictor = LatencyPredictor(profile, cache_dir=rows_path.parent / "predictor", log=print)
    # every table entry this evaluation can need, measured in one go before the full network
    # (assemblies: each stage at each width a mask can leave; Torch-Pruning: its gamma grid)
    warm = [base.arch]
    groups = factory.supernet.groups if factory is not None else 4
    for s_i, stage in enumerate(base.arch.hidden):
        width = stage[0]
        sizes = [len(g) for g in channel_groups(width, groups)]
        for w in sorted({1, *(sum(sizes[: k + 1]) for k in range(len(sizes)))}):
            hidden = [list(st) for st in base.arch.hidden]
            hidden[s_i] = [w] * len(stage)
            warm.append(hidden_arch(base.arch, hidden))
    for g in [round(0.025 * i, 3) for i in range(39)]:
        warm.append(hidden_arch(base.arch, shape_for_gamma(base.arch, "all", g)))
    for _, net in sources.values():  # with the classifier cut to each task size
        for k in sorted({len(t) for t, _ in tasks}):
            arch = copy.deepcopy(net.arch)
            arch.num_classes = k
            warm.append(arch)
    predictor.ensure(warm)
    full_path = rows_path.parent / "full_latency.json"
    predicted_full = round(predictor.predict(base.arch), 4)
    if conf.get("full_latency_ms"):
        full_ms = float(conf["full_latency_ms"])
    elif full_path.exists():
        full_ms = json.loads(full_path.read_text())["latency_ms"]
    else:
        meas = measure_model(base, profile)
        # the reference of every budget: the full network measured end to end (absolute check)
        # or predicted by the table just measured (ratio check, see --check)
        full_ms = round(meas.latency_ms, 4) if args.check == "absolute" else predicted_full
        info = {
            "latency_ms": full_ms,
            "check": args.check,
            "measured_ms": round(meas.latency_ms, 4),
            "iqr_ms": round(meas.latency.iqr_ms, 4),
            "predicted_ms": predicted_full,
            "model": conf["base"],
            "profile": profile.name,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load": round(os.getloadavg()[0], 2),
        }
        full_path.write_text(json.dumps(info))
    print(f"full network: {full_ms} ms on {profile.name} (check: {args.check})")

    class Ratio:
        """The end-to-end check as a ratio to the full network measured right after the
        candidate (on a shared machine both see the same load): the measurement reported is
        ``candidate / full x full_ms``, the raw figures are kept."""

        def __init__(self, cand, full):
            self.raw, self.full = cand, full
            self.ratio = cand.latency_ms / full.latency_ms
            self.latency_ms = self.ratio * full_ms
            self.memory_mb = cand.memory_mb
            self.latency = cand.latency

    def check(model):
        cand = measure_model(model, profile)
        if args.check == "absolute":
            return cand
        return Ratio(cand, measure_model(base, profile))

    def budget_of(frac: float) -> Budget:
        return Budget(max_latency_ms=round(frac * full_ms, 4), device=conf["device"])

    def emit(row: dict) -> None:
        rows.append(row)
        done.add(_key(row))
        with rows_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def base_row(method, task, seen, frac, budget) -> dict:
        return {
            "method": method,
            "task": task_names(task),
            "seen": seen,
            "budget_frac": frac,
            "budget_ms": budget.max_latency_ms,
        }

    def option_fields(o, budget) -> dict:
        m = None if o.measured is None else round(o.measured.latency_ms, 4)
        extra = {}
        if isinstance(o.measured, Ratio):
            extra = {
                "measured_raw_ms": round(o.measured.raw.latency_ms, 4),
                "full_measured_ms": round(o.measured.full.latency_ms, 4),
                "measured_ratio": round(o.measured.ratio, 4),
            }
        return {
            **extra,
            "predicted_ms": None if o.predicted_ms is None else round(o.predicted_ms, 4),
            "measured_ms": m,
            "measured_iqr_ms": None if o.measured is None else round(o.measured.latency.iqr_ms, 4),
            "violation": m is not None and m > budget.max_latency_ms,
            "params": o.params,
            "flops": o.flops,
        }

    def nnf_row(method, task, seen, frac, budget, **kw) -> dict:
        row = base_row(method, task, seen, frac, budget)
        proxy = _proxy_set(dm, "val", task, int(conf["proxy_images"]), seed)
        t0 = time.perf_counter()
        try:
            res = customize(
                factory,
                task,
                budget,
                proxy,
                sparsities,
                int(conf["candidates"]),
                seed,
                int(conf["rank_top"]),
                predictor=predictor,
                measure=check,
                **kw,
            )
        except BudgetError as e:
            return {**row, "acc": None, "violation": False, "error": str(e).splitlines()[0]}
        wall = time.perf_counter() - t0
        acc, n_img = test.task_accuracy(res.model, task)
        c = res.chosen
        return {
            **row,
            "acc": round(acc, 2),
            "test_images": n_img,
            **option_fields(res.option, budget),
            "wall_s": round(wall, 3),
            "customize_s": res.timings["customize_s"],
            "sparsity": c.sparsity,
            "candidate": c.label,
            "modules_on": int(sum(c.mask)),
            "proxy_acc": c.proxy_acc,
            "hidden": res.model.arch.hidden,
        }

    def prune(budget):
        """The full network pruned by Torch-Pruning to ``budget``: ``(pruned, option)``."""
        pruned, option, _ = bl.prune_to_budget(
            base,
            budget,
            criterion=conf["prune_criterion"],
            predictor=predictor,
            measure=check,
            log=print,
        )
        return pruned, option

    def finetune_tasks():
        k = int(conf.get("finetune_tasks") or 0)
        if not k:
            return tasks
        return [t for t in tasks if t[1]][:k] + [t for t in tasks if not t[1]][:k]

    def finetuned(src, task) -> tuple[torch.nn.Module, dict]:
        """``src`` with its classifier cut to the task, fine-tuned ``finetune_steps`` steps on
        the task's train images (the fine-tune of tp_ft / ft_r56 / ft_r20), and its fields."""
        net, rep = bl.task_finetune(src, dm, task, int(conf["finetune_steps"]), seed=seed)
        acc, n_img = test.task_accuracy(net, task)
        c = arch_costs(net.arch)
        return net, {
            "acc": round(acc, 2),
            "test_images": n_img,
            "params": c["params"],
            "flops": c["flops"],
            "finetune_s": round(rep["seconds"], 3),
            "finetune_steps": rep["steps"],
            "hidden": net.arch.hidden,
        }

    for method in args.methods:
        if method in sources:
            path, src = sources[method]
            for task, seen in finetune_tasks():
                keys = [(method, tuple(task_names(task)), float(f)) for f in fracs]
                if all(k in done for k in keys):
                    continue
                net, fields = finetuned(src, task)
                t0 = time.perf_counter()
                c = arch_costs(net.arch)
                option = Option(
                    method,
                    None,
                    c["params"],
                    c["flops"],
                    predicted_ms=predictor.predict(net.arch),
                    measured=check(net),
                )
                measure_s = time.perf_counter() - t0
                for frac, k in zip(fracs, keys, strict=True):
                    if k in done:
                        continue
                    budget = budget_of(frac)
                    emit(
                        {
                            **base_row(method, task, seen, frac, budget),
                            **option_fields(option, budget),
                            **fields,
                            "wall_s": round(fields["finetune_s"] + measure_s, 3),
                            "measure_s": round(measure_s, 3),
                            "model": str(path),
                            "unpruned": True,
                        }
                    )
            continue
        for frac in fracs:
            budget = budget_of(frac)
            if method in ("nnfactory", "nnfactory_bn", "random"):
                for task, seen in tasks:
                    if (method, tuple(task_names(task)), float(frac)) in done:
                        continue
                    kw = {}
                    if method == "nnfactory_bn":
                        kw["bn_images"] = _proxy_set(
                            dm, "train", task, int(conf["bn_images"]), seed + 1
                        )[0]
                    if method == "random":
                        ref = [
                            r
                            for r in rows
                            if _key(r) == ("nnfactory", tuple(task_names(task)), float(frac))
                        ]
                        s0 = (
                            ref[0].get("sparsity")
                            if ref and ref[0].get("sparsity") is not None
                            else 0.5
                        )
                        grid = [s for s in sparsities if s >= s0 - 1e-9]
                        kw["candidates"] = bl.random_candidates(
                            factory.supernet.num_modules, grid, int(conf["random_candidates"]), seed
                        )
                    row = nnf_row(method, task, seen, frac, budget, **kw)
                    if method == "nnfactory_bn":
                        row["bn_images"] = int(conf["bn_images"])
                    emit(row)
            elif method in ("agnostic", "tp"):
                if all((method, tuple(task_names(t)), float(frac)) in done for t, _ in tasks):
                    continue
                t0 = time.perf_counter()
                try:
                    if method == "agnostic":
                        every = bl.all_classes(factory)
                        proxy = _proxy_set(dm, "val", every, int(conf["proxy_images"]), seed)
                        cands = bl.agnostic_candidates(
                            factory, sparsities, int(conf["candidates"]), seed
                        )
                        res = customize(
                            factory,
                            every,
                            budget,
                            proxy,
                            sparsities,
                            1,
                            seed,
                            int(conf["rank_top"]),
                            predictor=predictor,
                            measure=check,
                            candidates=cands,
                        )
                        model, option = res.model, res.option
                        extra = {
                            "sparsity": res.chosen.sparsity,
                            "modules_on": int(sum(res.chosen.mask)),
                            "candidate": res.chosen.label,
                        }
                    else:
                        model, option = prune(budget)
                        extra = {"gamma": option.item[0]}
                    err = None
                except BudgetError as e:
                    err = str(e).splitlines()[0]
                wall = time.perf_counter() - t0
                if err is None:
                    accs = test.per_task(test.all_logits(model), [t for t, _ in tasks])
                    extra["hidden"] = model.arch.hidden
                for task, seen in tasks:
                    row = base_row(method, task, seen, frac, budget)
                    if err is not None:
                        emit({**row, "acc": None, "violation": False, "error": err})
                        continue
                    acc, n_img = accs[tuple(task)]
                    emit(
                        {
                            **row,
                            "acc": round(acc, 2),
                            "test_images": n_img,
                            **option_fields(option, budget),
                            "wall_s": round(wall, 3),
                            "shared_by_all_tasks": True,
                            **extra,
                        }
                    )
            elif method == "tp_ft":
                ft_tasks = finetune_tasks()
                if all((method, tuple(task_names(t)), float(frac)) in done for t, _ in ft_tasks):
                    continue
                t0 = time.perf_counter()
                try:
                    pruned, option = prune(budget)
                    err = None
                except BudgetError as e:
                    err = str(e).splitlines()[0]
                prune_s = time.perf_counter() - t0
                for task, seen in ft_tasks:
                    row = base_row(method, task, seen, frac, budget)
                    if (method, tuple(task_names(task)), float(frac)) in done:
                        continue
                    if err is not None:
                        emit({**row, "acc": None, "violation": False, "error": err})
                        continue
                    _, fields = finetuned(pruned, task)
                    emit(
                        {
                            **row,
                            **option_fields(option, budget),
                            **fields,
                            "wall_s": round(prune_s + fields["finetune_s"], 3),
                            "prune_s": round(prune_s, 3),
                            "gamma": option.item[0],
                        }
                    )


def paired(rows: list[dict]) -> list[dict]:
    """Each baseline against NN-Factory on the baseline's own tasks (a baseline run on fewer
    tasks is compared on those only): mean accuracy difference and how often it is above."""
    acc = {(r["method"], tuple(r["task"]), r["budget_frac"]): r.get("acc") for r in rows}
    out = []
    for m in sorted({r["method"] for r in rows} - {"nnfactory"}):
        for f in sorted({r["budget_frac"] for r in rows}):
            d = [
                a - acc[("nnfactory", t, ff)]
                for (mm, t, ff), a in acc.items()
                if mm == m and ff == f and a is not None
                and acc.get(("nnfactory", t, ff)) is not None
            ]  # fmt: skip
            if d:
                out.append(
                    {"method": m, "budget_frac": f, "tasks": len(d),
                     "mean_minus_nnfactory": round(sum(d) / len(d), 2),
                     "above": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d)}
                )  # fmt: skip
    return out


def write_table(rows: list[dict], out: Path) -> dict:
    from metamorph.methods.nnfactory.evaluation import markdown, summarize

    summary = summarize(rows)
    (out / "table.md").write_text(markdown(summary) + "\n")
    if summary:
        with (out / "table.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(summary[0]))
            w.writeheader()
            w.writerows(summary)
    print(markdown(summary))
    pairs = paired(rows)
    lines = [
        "| method | budget (x full) | tasks | mean acc - nnfactory | above | ties |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {q['method']} | {q['budget_frac']} | {q['tasks']} | {q['mean_minus_nnfactory']} | "
        f"{q['above']} | {q['ties']} |"
        for q in pairs
    ]
    (out / "paired.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    result = {"rows": len(rows), "summary": summary, "paired": pairs}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"nnfactory_eval: {e}")
