"""Bespoke (issue 24) on CIFAR-10 at three measured latency budgets, beside its baselines.

Every stage is one command run in a child process (one at a time, ``OMP_NUM_THREADS=1``), its
wall time, CPU time (user + sys of the child), start/end and machine load recorded in
``outputs/bespoke/jobs/<job>.json`` with the command line and the command's one-line JSON summary;
a job with a record is not run again (rerun the script to continue after a kill).

    python scripts/bespoke_eval.py run                 # every job, in order
    python scripts/bespoke_eval.py run --only 'base_*' # a subset (fnmatch on job names)
    python scripts/bespoke_eval.py list                # the jobs and whether they are done
    python scripts/bespoke_eval.py table               # the results table (markdown)

Jobs, in order: the teacher's cpu1_b1 latency (``metamorph-profile``); the Bespoke house
(``experiment=bespoke/recipe/preprocess_resnet56_cifar10_cpu``); at 40/60/80% of the teacher's
latency the Bespoke search, its retraining (``experiment=bespoke/recipe/retrain_resnet56_cifar10_cpu``:
KD from the teacher, a fixed step budget); the ResNet-20/32/44 (akamaster) retrained with the
same recipe and step budget, with KD and without (``task.kd_weight=0``: plain fine-tuning); the
teacher-only ablation (``bespoke.teacher_only=true``) and the LANA baseline (its own house,
``bespoke.search=lana``) searched and retrained; the teacher pruned with Torch-Pruning (uniform L1
over every block's hidden channels, the ratio picked by measured latency) and retrained. Last,
``measure``: every final model file measured on cpu1_b1 in one process, in interleaved rounds.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bespoke"
JOBS = OUT / "jobs"
MODELS = ROOT / "outputs" / "models"
TEACHER = MODELS / "resnet56_ft.json"
AKAMASTER = ROOT.parent / "shared" / "pretrained" / "akamaster-cifar10"
PUBLIC = ("resnet20", "resnet32", "resnet44")
PERCENTS = (40, 60, 80)
DEVICE = "cpu1_b1"
HOUSE = OUT / "house_resnet56"
LANA_HOUSE = OUT / "house_lana_resnet56"
RETRAIN = "experiment=bespoke/recipe/retrain_resnet56_cifar10_cpu"
PRUNE_GAMMAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[:3].__str__()
    except OSError:
        return "?"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def akamaster(name: str) -> Path:
    found = sorted(AKAMASTER.glob(f"{name}-*.th"))
    if not found:
        raise SystemExit(f"bespoke_eval: no {name}-*.th in {AKAMASTER}")
    return found[0]


def teacher_ms() -> float:
    rec = record("teacher_profile")
    if rec is None:
        raise SystemExit("bespoke_eval: run the teacher_profile job first")
    return float(rec["summary"]["latency_ms"])


def budget(p: int) -> float:
    return round(teacher_ms() * p / 100.0, 3)


def record(name: str) -> dict | None:
    path = JOBS / f"{name}.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    return rec if rec.get("rc") == 0 else None


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def run_job(name: str, cmd: list[str], timeout: int = 3600) -> dict:
    """Run ``cmd`` (1 thread), log to outputs/logs/bespoke_<name>.log, record wall/CPU time."""
    JOBS.mkdir(parents=True, exist_ok=True)
    log = ROOT / "outputs" / "logs" / f"bespoke_{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"[bespoke_eval] {now()} {name}: {' '.join(cmd)}", flush=True)
    start, load0 = now(), uptime()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
        )
    wall = time.time() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    text = log.read_text(errors="replace")
    rec = {
        "job": name,
        "cmd": " ".join(cmd),
        "rc": proc.returncode,
        "start": start,
        "end": now(),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "loadavg_before": load0,
        "loadavg_after": uptime(),
        "log": str(log.relative_to(ROOT)),
        "summary": last_json(text),
    }
    tmp = JOBS / f".{name}.json.tmp"
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(JOBS / f"{name}.json")
    status = "ok" if proc.returncode == 0 else f"FAILED rc={proc.returncode} (see {log})"
    print(f"[bespoke_eval] {name}: {status}, {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
    return rec


# ----------------------------------------------------------------------------------------------
# The jobs
# ----------------------------------------------------------------------------------------------


def latency_scale(house: Path) -> float:
    """The teacher's latency for the budgets (median of 5 metamorph-profile runs) over its declared
    sum in the house's latency table: the search's calibration, fixed (one in-process measurement
    at search time read 22.9 ms for a 6.0 ms teacher on the loaded machine)."""
    declared = json.loads((house / "preprocess.json").read_text())["declared_teacher_ms"]
    return round(teacher_ms() / float(declared), 4)


def retrain_cmd(name: str, student: str, *extra: str) -> list[str]:
    return [
        "metamorph-train",
        RETRAIN,
        f"task.student={student}",
        f"name=bespoke_{name}",
        f"hydra.run.dir=outputs/runs/bespoke_{name}",
        f"export_to={MODELS / ('bespoke_' + name)}",
        "task.onnx=false",
        *extra,
    ]


def customize_cmd(variant: str, p: int, args) -> list[str]:
    house = LANA_HOUSE if variant == "lana" else HOUSE
    cmd = [
        "metamorph-customize",
        "method=bespoke",
        f"bespoke.house={house}",
        f"budget.max_latency_ms={budget(p)}",
        f"device={DEVICE}",
        f"out={OUT / f'{variant}_p{p}'}",
        f"bespoke.anneal.steps={args.anneal_steps}",
        f"bespoke.proxy_images={args.proxy_images}",
        "bespoke.onnx=false",
        f"bespoke.latency_scale={latency_scale(house)}",
        "bespoke.measure_repeats=3",
        "bespoke.retries=2",
        "bespoke.top_states=10",
    ]
    if variant == "teacher_only":
        cmd.append("bespoke.teacher_only=true")
    if variant == "lana":
        cmd.append("bespoke.search=lana")
    return cmd


def jobs(args) -> list[tuple[str, callable]]:
    """(name, thunk returning the command) in run order; thunks run when the job is reached (the
    budgets need the teacher's measured latency)."""
    py = sys.executable
    out: list[tuple[str, callable]] = []
    out.append(
        (
            "teacher_profile",
            lambda: [py, __file__, "teacher-latency", "--n", "5"],
        )
    )
    out.append(
        (
            "teacher_eval",
            lambda: [
                "metamorph-eval",
                f"src={TEACHER}",
                "latency=false",
                f"data.root={ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg'}",
                "hydra.run.dir=outputs/runs/bespoke_teacher_eval",
            ],
        )
    )
    for net in PUBLIC:  # the public networks as downloaded, no step on this data
        out.append(
            (
                f"base_{net}_zero",
                lambda net=net: [
                    "metamorph-eval",
                    f"src={akamaster(net)}",
                    "latency=false",
                    f"data.root={ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg'}",
                    f"hydra.run.dir=outputs/runs/bespoke_{net}_zero",
                ],
            )
        )
    out.append(
        (
            "preprocess",
            lambda: [
                "metamorph-train",
                "experiment=bespoke/recipe/preprocess_resnet56_cifar10_cpu",
            ],
        )
    )
    for p in PERCENTS:
        out.append((f"search_bespoke_p{p}", lambda p=p: customize_cmd("bespoke", p, args)))
    for p in PERCENTS:
        out.append(
            (
                f"retrain_bespoke_p{p}",
                lambda p=p: retrain_cmd(
                    f"bespoke_p{p}", str(OUT / f"bespoke_p{p}.json"), *args.extra
                ),
            )
        )
    for net in PUBLIC:
        out.append(
            (
                f"base_{net}_kd",
                lambda net=net: retrain_cmd(f"{net}_kd", str(akamaster(net)), *args.extra),
            )
        )
    for net in PUBLIC:
        out.append(
            (
                f"base_{net}_ft",
                lambda net=net: retrain_cmd(
                    f"{net}_ft",
                    str(akamaster(net)),
                    "task.kd_weight=0",
                    "task.teacher=null",
                    *args.extra,
                ),
            )
        )
    for p in PERCENTS:
        out.append(
            (f"search_teacher_only_p{p}", lambda p=p: customize_cmd("teacher_only", p, args))
        )
    out.append(
        (
            "preprocess_lana",
            lambda: [
                "metamorph-train",
                "experiment=bespoke/recipe/preprocess_lana_resnet56_cifar10_cpu",
            ],
        )
    )
    for p in PERCENTS:
        out.append((f"search_lana_p{p}", lambda p=p: customize_cmd("lana", p, args)))
    out.append(("prune_grid", lambda: [py, __file__, "prune"]))
    for p in PERCENTS:
        out.append(
            (
                f"retrain_pruned_p{p}",
                lambda p=p: retrain_cmd(
                    f"pruned_p{p}", str(OUT / f"pruned_p{p}.json"), *args.extra
                ),
            )
        )
    for variant in ("teacher_only", "lana"):
        for p in PERCENTS:
            out.append(
                (
                    f"retrain_{variant}_p{p}",
                    lambda p=p, v=variant: retrain_cmd(
                        f"{v}_p{p}", str(OUT / f"{v}_p{p}.json"), *args.extra
                    ),
                )
            )
    measure_cmd = [py, __file__, "measure", "--rounds", str(args.rounds)]
    out.append(("measure_1", lambda: measure_cmd))  # what exists once the main comparison is in
    out.append(("measure", lambda: measure_cmd))
    # run order: the teacher's latency (the budgets) is measured after the house, when none of
    # this script's heavy jobs runs beside it; the main comparison (Bespoke vs ResNet-20/32/44)
    # first, then the ablation, LANA, pruning and the optional retrainings
    order = [
        "teacher_eval",
        "base_*_zero",
        "preprocess",
        "teacher_profile",
        "search_bespoke_*",
        "retrain_bespoke_*",
        "base_*_kd",
        "base_*_ft",
        "measure_1",
        "search_teacher_only_*",
        "preprocess_lana",
        "search_lana_*",
        "prune_grid",
        "retrain_pruned_*",
        "retrain_teacher_only_*",
        "retrain_lana_*",
        "measure",
    ]

    def rank(job):
        return next(i for i, pat in enumerate(order) if fnmatch.fnmatch(job[0], pat))

    return sorted(out, key=rank)


# ----------------------------------------------------------------------------------------------
# In-process stages (run as child jobs so their CPU time is counted)
# ----------------------------------------------------------------------------------------------


def prune_grid() -> None:
    """The teacher pruned (Torch-Pruning, L1, every block's hidden channels, uniform ratio) at
    each of PRUNE_GAMMAS, measured on cpu1_b1; for each budget the least-pruned one measured
    within it is saved as outputs/bespoke/pruned_p<p>."""
    import torch

    torch.set_num_threads(1)
    from metamorph.baselines.pruning import prune_to_gamma
    from metamorph.devices import measure_model
    from metamorph.io.model_file import load_model, save_model

    teacher = load_model(TEACHER).eval()
    curve = []
    nets = {}
    for g in PRUNE_GAMMAS:
        net = prune_to_gamma(teacher, "all", g, "l1")
        m = measure_model(net, DEVICE)
        curve.append({"gamma": g, "latency_ms": m.latency_ms, "params": m.params, "flops": m.flops})
        nets[g] = net
        print(f"gamma {g}: {m.latency_ms:.3f} ms, {m.params:,} params", flush=True)
    chosen = {}
    for p in PERCENTS:
        b = budget(p)
        ok = [c for c in curve if c["latency_ms"] <= b]
        if not ok:
            raise SystemExit(f"no pruning ratio in {PRUNE_GAMMAS} measures within {b} ms ({p}%)")
        c = min(ok, key=lambda c: c["gamma"])
        chosen[p] = c
        save_model(nets[c["gamma"]], OUT / f"pruned_p{p}", meta={"pruning": {**c, "budget_ms": b}})
    summary = {"curve": curve, "chosen": {str(p): c for p, c in chosen.items()}}
    (OUT / "prune_grid.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


def teacher_latency(n: int) -> None:
    """The teacher's cpu1_b1 latency for the budgets: ``n`` metamorph-profile runs one after the
    other (each a fresh process, its own median), the median of their medians (the shared
    machine's load makes one run's median swing by a factor up to 1.5)."""
    import statistics

    runs = []
    for i in range(n):
        out = OUT / f"teacher_profile_{i}.json"
        cmd = ["metamorph-profile", f"model={TEACHER}", f"device={DEVICE}", f"out={out}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
        s = last_json(proc.stdout)
        runs.append(
            {"latency_ms": s["latency_ms"], "iqr_ms": s["latency_iqr_ms"], "load": uptime()}
        )
        print(f"run {i}: {s['latency_ms']:.3f} ms (IQR {s['latency_iqr_ms']:.3f})", flush=True)
    med = statistics.median(r["latency_ms"] for r in runs)
    print(json.dumps({"latency_ms": round(med, 4), "runs": runs, "cmd": " ".join(cmd[:-1])}))


def final_models() -> dict[str, Path]:
    """Every model file to measure: the teacher, the searched students before and after
    retraining, the baselines."""
    out = {"teacher": TEACHER}
    for p in PERCENTS:
        for v in ("bespoke", "teacher_only", "lana"):
            out[f"{v}_p{p}_search"] = OUT / f"{v}_p{p}.json"
            out[f"{v}_p{p}"] = MODELS / f"bespoke_{v}_p{p}.json"
        out[f"pruned_p{p}"] = MODELS / f"bespoke_pruned_p{p}.json"
    for net in PUBLIC:
        out[f"{net}_kd"] = MODELS / f"bespoke_{net}_kd.json"
        out[f"{net}_ft"] = MODELS / f"bespoke_{net}_ft.json"
    return {k: v for k, v in out.items() if v.is_file()}


def measure(rounds: int) -> None:
    """Every final model on cpu1_b1, one process, ``rounds`` interleaved rounds; per model the
    fastest round's median (the figure used; other processes' load only adds time) and the
    median over rounds."""
    import statistics

    import torch

    torch.set_num_threads(1)
    import metamorph.methods.bespoke.lana  # noqa: F401  (the dwsep family, for LANA students)
    from metamorph.devices import measure_model
    from metamorph.io.model_file import load_model

    files = final_models()
    nets = {k: load_model(v).eval() for k, v in files.items()}
    per: dict[str, list[float]] = {k: [] for k in nets}
    info: dict[str, dict] = {}
    loads = [uptime()]
    for _ in range(rounds):
        for k, net in nets.items():
            m = measure_model(net, DEVICE)
            per[k].append(m.latency_ms)
            info[k] = {"params": m.params, "flops": m.flops}
        loads.append(uptime())
    res = {
        k: {
            "file": str(files[k].relative_to(ROOT)),
            "latency_ms": round(min(v), 4),  # the fastest round: load only adds time
            "median_ms": round(statistics.median(v), 4),
            "rounds_ms": [round(x, 4) for x in v],
            **info[k],
        }
        for k, v in per.items()
    }
    summary = {"device": DEVICE, "rounds": rounds, "loadavg": loads, "when": now(), "models": res}
    (OUT / "latency_final.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({"measured": len(res), "loadavg": loads}))


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def table() -> str:
    lat = (
        json.loads((OUT / "latency_final.json").read_text())["models"]
        if (OUT / "latency_final.json").is_file()
        else {}
    )

    def cpu_min(*names: str) -> str:
        recs = [record(n) for n in names]
        if any(r is None for r in recs):
            return "-"
        return f"{sum(r['cpu_s'] for r in recs) / 60:.1f}"

    def acc(job: str, key: str = "test/acc") -> str:
        r = record(job)
        v = None if r is None else r["summary"].get(key)
        return "-" if v is None else f"{float(v) * (100 if float(v) <= 1 else 1):.2f}"

    def ms(k: str) -> str:
        return f"{lat[k]['latency_ms']:.3f}" if k in lat else "-"

    def params(k: str) -> str:
        return f"{lat[k]['params']:,}" if k in lat else "-"

    rows = [
        "| model | budget | test acc before | test acc after | cpu1_b1 ms | params | CPU-min (stages) |",
        "|---|---|---|---|---|---|---|",
    ]
    t = record("teacher_profile")
    te = record("teacher_eval")
    te_acc = "-"
    if te is not None:
        accs = [v for k, v in te["summary"].items() if "acc" in k and isinstance(v, (int, float))]
        te_acc = f"{accs[0] * (100 if accs[0] <= 1 else 1):.2f}" if accs else "-"
    rows.append(
        f"| teacher ResNet-56 (ft) | - | - | {te_acc} | {ms('teacher')} | {params('teacher')} | - |"
    )
    pre, lana_pre = cpu_min("preprocess"), cpu_min("preprocess_lana")
    for p in PERCENTS:
        b = budget(p) if t else float("nan")
        for v, prep in (("bespoke", pre), ("teacher_only", pre), ("lana", lana_pre)):
            s = record(f"search_{v}_p{p}")
            before = "-" if s is None else f"{s['summary'].get('test_acc_before_retrain', '-')}"
            rows.append(
                f"| {v} p{p} | {b:.3f} | {before} | {acc(f'retrain_{v}_p{p}')} | {ms(f'{v}_p{p}')} | "
                f"{params(f'{v}_p{p}')} | house {prep} + search {cpu_min(f'search_{v}_p{p}')} + "
                f"retrain {cpu_min(f'retrain_{v}_p{p}')} |"
            )
        rows.append(
            f"| pruned teacher p{p} | {b:.3f} | - | {acc(f'retrain_pruned_p{p}')} | {ms(f'pruned_p{p}')} | "
            f"{params(f'pruned_p{p}')} | grid {cpu_min('prune_grid')} + retrain {cpu_min(f'retrain_pruned_p{p}')} |"
        )
    for net in PUBLIC:
        z = record(f"base_{net}_zero")
        za = "-" if z is None else f"{z['summary'].get('acc', '-')}"
        rows.append(f"| {net} as published (no step) | - | - | {za} | - | - | - |")
        for kind in ("kd", "ft"):
            rows.append(
                f"| {net} {kind} | - | - | {acc(f'base_{net}_{kind}')} | {ms(f'{net}_{kind}')} | "
                f"{params(f'{net}_{kind}')} | retrain {cpu_min(f'base_{net}_{kind}')} |"
            )
    return "\n".join(rows)


def points() -> dict[str, list[tuple[float, float, str]]]:
    """(measured ms, test acc %, label) per series, for the plot."""
    lat = json.loads((OUT / "latency_final.json").read_text())["models"]

    def acc(job: str) -> float | None:
        r = record(job)
        v = None if r is None else r["summary"].get("test/acc")
        return None if v is None else float(v) * (100 if float(v) <= 1 else 1)

    series: dict[str, list] = {}

    def add(name: str, key: str, job: str, label: str) -> None:
        a = acc(job)
        if key in lat and a is not None:
            series.setdefault(name, []).append((lat[key]["latency_ms"], a, label))

    for p in PERCENTS:
        add("Bespoke (retrained)", f"bespoke_p{p}", f"retrain_bespoke_p{p}", f"{p}%")
        add(
            "Bespoke teacher-only (retrained)",
            f"teacher_only_p{p}",
            f"retrain_teacher_only_p{p}",
            f"{p}%",
        )
        add("LANA-style MILP (retrained)", f"lana_p{p}", f"retrain_lana_p{p}", f"{p}%")
        add("Torch-Pruning + KD", f"pruned_p{p}", f"retrain_pruned_p{p}", f"{p}%")
    for net in PUBLIC:
        add("ResNet-20/32/44 + KD", f"{net}_kd", f"base_{net}_kd", net[6:])
        add("ResNet-20/32/44 fine-tuned", f"{net}_ft", f"base_{net}_ft", net[6:])
    te = record("teacher_eval")
    if te is not None and "teacher" in lat:
        series["teacher ResNet-56"] = [
            (lat["teacher"]["latency_ms"], float(te["summary"]["acc"]), "")
        ]
    return series


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in points().items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name, ms=5)
        for x, y, lab in pts:
            if lab:
                ax.annotate(lab, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="measured latency, cpu1_b1 (ms)", ylabel="CIFAR-10 test accuracy (%)")
    ax.set_title("Bespoke vs baselines, same 150-step retraining budget", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "command", choices=("run", "list", "table", "plot", "prune", "measure", "teacher-latency")
    )
    ap.add_argument("--only", default="*", help="fnmatch pattern(s) of jobs, comma-separated")
    ap.add_argument("--anneal-steps", type=int, default=150)
    ap.add_argument("--proxy-images", type=int, default=0, help="0: all the house cached")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=5, help="teacher-latency: metamorph-profile runs")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every retraining")
    ap.add_argument("--stop-on-failure", action="store_true")
    args = ap.parse_args(argv)
    if args.command == "prune":
        return prune_grid()
    if args.command == "measure":
        return measure(args.rounds)
    if args.command == "teacher-latency":
        return teacher_latency(args.n)
    if args.command == "plot":
        return plot(ROOT / "docs" / "results" / "bespoke_acc_latency.png")
    if args.command == "table":
        print(table())
        return
    pats = args.only.split(",")
    for name, thunk in jobs(args):
        if not any(fnmatch.fnmatch(name, p) for p in pats):
            continue
        done = record(name) is not None
        if args.command == "list":
            print(f"{'done' if done else '    '}  {name}")
            continue
        if done:
            continue
        rec = run_job(name, thunk())
        if rec["rc"] != 0 and args.stop_on_failure:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
