"""Preprocessing, once per teacher: train every alternative of the house alone to mimic its
teacher segment (feature MSE on the cached boundary activations), and measure every unit's
latency on the device profile.

Alternatives train in parallel with joblib (``n_jobs``, one torch thread each), each one reading
only its two boundaries. Each finished alternative is one ``alternatives/<id>.safetensors`` file
(its weights plus, in the metadata, its spec, loss and training time), written atomically: a run
killed half-way resumes with the files it has and trains only the rest. Latencies are measured
one at a time in the parent process (never beside running training jobs) and cached in
``latency.json`` entry by entry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from metamorph.devices.measure import time_module
from metamorph.devices.profiles import get_profile
from metamorph.io.atomic import atomic_path, atomic_write_text
from metamorph.methods.bespoke.features import FeatureCache
from metamorph.methods.bespoke.house import AltSpec
from metamorph.methods.bespoke.student import StemHead
from metamorph.models.resnet_cifar import CifarResNet

TEACHER_E2E = "_teacher_end_to_end"


def result_path(folder: Path, spec: AltSpec) -> Path:
    return Path(folder) / "alternatives" / f"{spec.id}.safetensors"


def read_result(path: Path, module: nn.Module) -> dict:
    """Load a finished alternative's weights into ``module``; returns its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    state = load_file(str(path))
    if state or any(True for _ in module.state_dict()):
        module.load_state_dict(state)
    return {k: json.loads(v) for k, v in meta.items()}


def train_alternative(
    module: nn.Module,
    x_path: str,
    y_path: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[dict, float, int]:
    """Feature-MSE training of ``module`` on (boundary a, boundary b); one torch thread.
    Returns (state dict, final epoch's mean loss, optimizer steps)."""
    import numpy as np

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.load(x_path)).float()
    y = torch.from_numpy(np.load(y_path)).float()
    params = [p for p in module.parameters() if p.requires_grad]
    module.train()
    if not params:  # the identity: nothing to learn
        with torch.no_grad():
            loss = F.mse_loss(module(x), y).item()
        return module.state_dict(), loss, 0
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps, last = 0, float("nan")
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.mse_loss(module(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
            steps += 1
        last = total / max(1, n)
    module.eval()
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}, last, steps


def _train_one(spec: AltSpec, module: nn.Module, *args):
    t = time.perf_counter()
    state, loss, steps = train_alternative(module, *args)
    return spec, state, loss, steps, time.perf_counter() - t


def train_house(
    folder: Path,
    specs: list[AltSpec],
    modules: dict[str, nn.Module],
    cache: FeatureCache,
    epochs: int,
    batch_size: int,
    lr: float,
    n_jobs: int = 1,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Train the alternatives that have no result file yet; returns every alternative's
    metadata (loss, steps, seconds, resumed)."""
    from joblib import Parallel, delayed

    (Path(folder) / "alternatives").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    todo = []
    for spec in specs:
        path = result_path(folder, spec)
        if path.is_file():
            meta = read_result(path, modules[spec.id])
            if meta.get("spec") == spec.to_dict():
                results[spec.id] = {**meta, "resumed": True}
                continue
        todo.append(spec)
    log(f"[bespoke] {len(results)} alternatives already trained, {len(todo)} to train")

    args = [
        (
            s,
            modules[s.id],
            str(cache.path(s.segment[0])),
            str(cache.path(s.segment[1])),
            epochs,
            batch_size,
            lr,
            seed + k,
        )
        for k, s in enumerate(todo)
    ]
    if n_jobs == 1:
        stream = (_train_one(*a) for a in args)
    else:  # results come back as each finishes, so each is saved before the next is awaited
        stream = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
            delayed(_train_one)(*a) for a in args
        )
    for spec, state, loss, steps, secs in stream:
        modules[spec.id].load_state_dict(state)
        meta = {"spec": spec.to_dict(), "mse": loss, "steps": steps, "train_s": round(secs, 3)}
        with atomic_path(result_path(folder, spec)) as tmp:
            save_file(
                {k: v.contiguous() for k, v in state.items()},
                str(tmp),
                metadata={k: json.dumps(v) for k, v in meta.items()},
            )
        results[spec.id] = {**meta, "resumed": False}
        log(f"[bespoke] trained {spec.id}: mse {loss:.4g} in {secs:.1f} s")
    return results


def boundary_shapes(teacher: CifarResNet, resolution: int = 32) -> list[tuple[int, int, int]]:
    """``(C, H, W)`` of every block boundary (one image)."""
    with torch.no_grad():
        h = teacher(torch.zeros(1, teacher.arch.in_channels, resolution, resolution), stop=0)
        shapes = [tuple(h.shape[1:])]
        for blk in teacher.blocks():
            h = blk(h)
            shapes.append(tuple(h.shape[1:]))
    return shapes


def measure_table(
    folder: Path,
    teacher: CifarResNet,
    specs: list[AltSpec],
    modules: dict[str, nn.Module],
    device: str,
    min_run_time: float,
    log: Callable[[str], None] = print,
    timer: Callable | None = None,
) -> dict[str, float]:
    """Median latency (ms) on ``device`` of the stem+head, every teacher block and every
    alternative, each on an input of its own shape at the profile's batch size; cached in
    ``latency.json`` (an entry measured once is not measured again)."""
    p = get_profile(device)
    path = Path(folder) / "latency.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    if table.get("_profile") != p.name:
        table = {"_profile": p.name}
    shapes = boundary_shapes(teacher, p.resolution)
    timer = timer or (lambda m, x: time_module(m, x, p, min_run_time).median_ms)
    gen = torch.Generator().manual_seed(0)

    def rand(shape):
        return torch.randn((p.batch_size, *shape), generator=gen)

    pieces: list[tuple[str, nn.Module, tuple]] = [
        ("stem_head", StemHead(teacher), (teacher.arch.in_channels, p.resolution, p.resolution))
    ]
    pieces += [(f"block:{i}", blk, shapes[i]) for i, blk in enumerate(teacher.blocks())]
    pieces += [(f"alt:{s.id}", modules[s.id], shapes[s.segment[0]]) for s in specs]
    todo = [(k, m, sh) for k, m, sh in pieces if k not in table]
    if todo:
        log(f"[bespoke] measuring {len(todo)} latency entries on {p.name}")
    for k, m, sh in todo:
        with torch.inference_mode():
            table[k] = float(timer(m.eval(), rand(sh)))
        atomic_write_text(path, json.dumps(table, indent=1))
    if TEACHER_E2E not in table:
        # the whole teacher, timed right after its pieces: the search may scale the declared
        # sums by end-to-end / sum (per-call overheads and caches make them differ)
        x = rand((teacher.arch.in_channels, p.resolution, p.resolution))
        with torch.inference_mode():
            table[TEACHER_E2E] = float(timer(teacher.eval(), x))
        atomic_write_text(path, json.dumps(table, indent=1))
    return table


class House:
    """A preprocessed model house read back from its folder: the teacher, the trained
    alternatives, the latency table and the proxy features."""

    def __init__(self, folder: str | Path) -> None:
        from metamorph.methods.bespoke.house import build_alternative, load_public, read_house
        from metamorph.runtime.networks import load_any_model

        self.folder = Path(folder)
        meta, specs = read_house(self.folder)
        self.meta = meta
        self.teacher: CifarResNet = load_any_model(meta["teacher"]).eval()
        public = load_public(meta.get("public", []), meta.get("public_dir"))
        self.specs = specs
        self.modules: dict[str, nn.Module] = {}
        self.results: dict[str, dict] = {}
        missing = []
        for s in specs:
            mod = build_alternative(s, self.teacher, public)
            path = result_path(self.folder, s)
            if not path.is_file():
                missing.append(s.id)
                continue
            self.results[s.id] = read_result(path, mod)
            self.modules[s.id] = mod.eval()
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} alternatives of {self.folder} are not trained yet (e.g. "
                f"{missing[0]}); rerun task=bespoke_preprocess with task.out={self.folder} to finish"
            )
        lat = self.folder / "latency.json"
        if not lat.is_file():
            raise FileNotFoundError(f"{lat} not found: preprocessing did not finish; rerun it")
        self.latency: dict[str, float] = json.loads(lat.read_text())
        self.proxy = FeatureCache(self.folder / "features" / "proxy")
        for p in self.teacher.parameters():
            p.requires_grad_(False)
