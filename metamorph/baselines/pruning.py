"""Structured pruning of the metamorphic blocks' hidden channels, without fine-tuning.

The NeuMeta pruning baseline (official code, ``neumeta/prune/cifar.py``): Torch-Pruning's
``MetaPruner`` removes output channels of the metamorphic block's ``conv1`` (and with them the
matching ``bn1`` channels and ``conv2`` input channels), importance L1 (``p=1``), L2 (``p=2``),
random, Taylor or Hessian, ``group_reduction='first'`` (the score of ``conv1`` itself), in 5
iterative steps, no fine-tuning; the classifier and every other layer are left alone; Taylor and
Hessian scores come from 10 training batches. Here the target is a ``hidden`` shape (as
:attr:`ResNetArch.hidden`), so exactly the requested widths come out, and the result is rebuilt as
a plain :class:`CifarResNet` whose ``arch.hidden`` is the target (it saves and loads with
:func:`metamorph.io.save_model` / :func:`metamorph.load`).

Notes on the criteria (Torch-Pruning 1.6):

* Taylor: ``|w * dL/dw|`` summed per channel, gradients of the cross-entropy accumulated over the
  calibration batches (network in eval mode, so BN statistics are not touched).
* Hessian (Optimal Brain Damage): ``w^2 * E[g^2]`` with the mean over samples of the squared
  per-sample gradients (computed with ``torch.func.vmap``). Torch-Pruning's own
  ``HessianImportance.accumulate_grad`` tests ``name not in`` a dict keyed by parameters, so it
  keeps only the last sample's squared gradient; we feed it the intended average through
  ``weight.grad`` instead (its scoring then reads ``.grad`` directly).
* Random: seeded; L1 and L2 do not depend on data.

The calibration batches and the evaluation of a curve can skip the unchanged part of the network:
everything before the first pruned block is computed once (:class:`CachedEval`,
``calib_from``), which makes the layer3.2 curves about ten times cheaper on a CPU.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metamorph.models.metrics import top1
from metamorph.models.pruning import prune_to_widths
from metamorph.models.resnet_cifar import CifarResNet
from metamorph.models.segments import (
    Suffix,
    block_names,
    block_position,
    forward_from,
    forward_to,
    resolve_blocks,
)
from metamorph.models.subnet import check_hidden, hidden_arch, uniform_hidden

all_blocks = block_names  # this module's name for it before the models layer had it

Shape = list[list[int]]
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
CRITERIA = ("l1", "l2", "random", "taylor", "hessian")
NEEDS_DATA = ("taylor", "hessian")

__all__ = [
    "CRITERIA",
    "CachedEval",
    "Suffix",
    "all_blocks",
    "changed_blocks",
    "forward_from",
    "forward_to",
    "load_eval_data",
    "make_importance",
    "parse_gammas",
    "prune_l1_manual",
    "prune_to_gamma",
    "prune_to_shape",
    "pruning_curve",
    "read_curve_csv",
    "run_curve",
    "write_curve_csv",
    "resolve_blocks",
    "shape_for_gamma",
]


# --------------------------------------------------------------------------------------------
# Shapes and block names
# --------------------------------------------------------------------------------------------


def shape_for_gamma(arch, blocks: str | Iterable[str], gamma: float) -> Shape:
    """Every chosen block at ``max(1, round((1 - gamma) * full))`` hidden channels, the others
    at full width: the rule of :meth:`MetaResNet.shape_for_gamma` (the official pruning script
    uses ``int(64 * (1 - ratio))``; both agree at gamma = 0, 0.25, 0.5, 0.75)."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"compression ratio gamma={gamma} must be in [0, 1)")
    return uniform_hidden(arch.hidden, resolve_blocks(arch, blocks), gamma)


def changed_blocks(
    arch, hidden: Shape, blocks: str | Iterable[str] | None = None
) -> dict[str, int]:
    """Validate a pruning target; returns ``{block: target width}`` of the blocks that shrink.

    Depth must stay; widths may only shrink (to >= 1); with ``blocks`` given, only those may
    change."""
    allowed = resolve_blocks(arch, blocks) if blocks is not None else block_names(arch)
    ranges = {}
    for name in allowed:
        s, b = block_position(name)
        ranges[name] = (1, arch.hidden[s][b])
    kind = f"among the blocks to prune {sorted(allowed)}" if blocks is not None else "prunable"
    check_hidden(hidden, arch.hidden, ranges, None, kind, hint=" (pruning only shrinks)")
    return {
        f"layer{s + 1}.{b}": int(w)
        for s, (stage, bstage) in enumerate(zip(hidden, arch.hidden))
        for b, (w, full) in enumerate(zip(stage, bstage))
        if int(w) != full
    }


def _check_model(model: nn.Module) -> CifarResNet:
    if not isinstance(model, CifarResNet):
        raise TypeError(f"expected a CifarResNet, got {type(model).__name__}")
    return model


def _rebuild(model: CifarResNet, hidden: Shape, state: dict[str, torch.Tensor]) -> CifarResNet:
    net = CifarResNet(hidden_arch(model.arch, hidden))
    net.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    if hasattr(model, "meta"):
        net.meta = dict(model.meta)
    return net.eval()


# --------------------------------------------------------------------------------------------
# Running part of the network (prefix caching)
# --------------------------------------------------------------------------------------------


def _prefix_names(model: CifarResNet, start: str | None) -> list[str]:
    if start is None:
        return []
    before = block_names(model.arch)
    before = before[: before.index(start)]
    return [
        k
        for k in model.state_dict()
        if k.split(".")[0] in ("conv1", "bn1") or ".".join(k.split(".")[:2]) in before
    ]


class CachedEval:
    """Accuracy (%) of a network on fixed batches, the unchanged prefix computed once.

    ``CachedEval(base, batches, start="layer3.2")`` runs ``base`` up to the input of ``layer3.2``
    once; calling it on a network pruned from ``base`` (only ``layer3.2`` or later changed) runs
    only the rest. The prefix tensors of every network evaluated are checked against ``base``'s.
    """

    def __init__(self, base: CifarResNet, batches: Iterable, start: str | None = None) -> None:
        base = _check_model(base).eval()
        self.start = start
        self._prefix = {
            k: base.state_dict()[k].detach().clone() for k in _prefix_names(base, start)
        }
        with torch.no_grad():
            self.feats = [(forward_to(base, start, x), y) for x, y in batches]

    @torch.no_grad()
    def __call__(self, net: CifarResNet) -> float:
        net = net.eval()
        state = net.state_dict()
        for k, v in self._prefix.items():
            if k not in state or state[k].shape != v.shape or not torch.equal(state[k], v):
                raise ValueError(
                    f"{k} differs from the base network: the cached prefix (up to "
                    f"{self.start}) does not apply to this network"
                )
        return top1(lambda h: forward_from(net, self.start, h), self.feats)


# --------------------------------------------------------------------------------------------
# Torch-Pruning
# --------------------------------------------------------------------------------------------


def make_importance(criterion: str):
    """The Torch-Pruning importance of the official baseline, ``group_reduction='first'``."""
    import torch_pruning as tp

    imp = tp.importance
    if criterion == "l1":
        return imp.MagnitudeImportance(p=1, group_reduction="first")
    if criterion == "l2":
        return imp.MagnitudeImportance(p=2, group_reduction="first")
    if criterion == "random":
        return imp.RandomImportance()
    if criterion == "taylor":
        return imp.TaylorImportance(group_reduction="first")
    if criterion == "hessian":
        return imp.HessianImportance(group_reduction="first")
    raise ValueError(f"unknown pruning criterion {criterion!r}; choose one of {CRITERIA}")


def _taylor_grads(net: CifarResNet, batches: Batches, start: str | None) -> None:
    """Accumulate dCE/dw over the batches into ``.grad`` (eval mode: BN stats untouched)."""
    net.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(forward_from(net, start, x.detach()), y).backward()


def _hessian_grads(net: CifarResNet, batches: Batches, start: str | None, names: list[str]) -> None:
    """``.grad`` of the tensors ``names`` := mean over samples of the squared per-sample gradient."""
    from torch.func import functional_call, grad, vmap

    net.zero_grad(set_to_none=True)
    wrapper = Suffix(net, start)
    params = dict(net.named_parameters())
    fixed = {f"net.{k}": v.detach() for k, v in params.items() if k not in names}
    fixed.update({f"net.{k}": v for k, v in net.named_buffers()})

    def loss_one(chosen, x, y):
        p = {**fixed, **{f"net.{k}": v for k, v in chosen.items()}}
        out = functional_call(wrapper, p, (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    chosen = {k: params[k].detach() for k in names}
    acc = {k: torch.zeros_like(v) for k, v in chosen.items()}
    n = 0
    for x, y in batches:
        g = per_sample(chosen, x.detach(), y)
        for k in names:
            acc[k] += g[k].pow(2).sum(0)
        n += len(y)
    for k in names:
        params[k].grad = acc[k] / max(1, n)


def prune_to_shape(
    model: CifarResNet,
    hidden: Shape,
    criterion: str = "l1",
    calib_batches: Batches | None = None,
    *,
    blocks: str | Iterable[str] | None = None,
    steps: int = 5,
    seed: int = 0,
    calib_from: str | None = None,
    example_inputs: torch.Tensor | None = None,
    return_kept: bool = False,
):
    """Prune the hidden channels of ``model``'s blocks to the widths ``hidden`` with Torch-Pruning.

    ``model`` (a :class:`CifarResNet`, BN present or folded) is not modified. ``criterion`` is one
    of :data:`CRITERIA`; ``taylor`` and ``hessian`` need ``calib_batches`` (normalized
    ``(x, y)`` pairs; with ``calib_from="layer3.2"`` the ``x`` are the inputs of that block, see
    :func:`forward_to`). ``blocks`` optionally restricts which blocks may change. Returns the
    pruned network (and with ``return_kept`` a dict ``{block: kept channel indices}``).
    """
    import torch_pruning as tp

    model = _check_model(model)
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; choose one of {CRITERIA}")
    targets = changed_blocks(model.arch, hidden, blocks)
    kept = {n: list(range(model.arch.hidden[s][b])) for n, (s, b) in _positions(model.arch)}
    if not targets:
        net = _rebuild(model, hidden, model.state_dict())
        return (net, kept) if return_kept else net
    if criterion in NEEDS_DATA and not calib_batches:
        raise ValueError(f"criterion {criterion!r} needs calibration batches (calib_batches)")
    order = block_names(model.arch)
    if calib_from is not None and order.index(calib_from) > min(map(order.index, targets)):
        raise ValueError(f"calib_from={calib_from} comes after the first pruned block")

    work = copy.deepcopy(model).eval().requires_grad_(True)
    conv1 = {n: work.get_submodule(f"{n}.conv1") for n in targets}
    roots = set(conv1.values())
    ignored = [
        m for m in work.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in roots
    ]
    eps = 1e-6  # int(full * (1 - ratio)) must come out as the target, not one below
    ratios = {
        conv1[n]: (conv1[n].out_channels - w) / conv1[n].out_channels - eps
        for n, w in targets.items()
    }
    if example_inputs is None:
        example_inputs = torch.zeros(1, model.arch.in_channels, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            work,
            example_inputs,
            importance=make_importance(criterion),
            pruning_ratio=0.0,
            pruning_ratio_dict=ratios,
            ignored_layers=ignored,
            iterative_steps=steps,
            global_pruning=False,
        )
        names = [f"{n}.conv1.weight" for n in targets]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for _ in range(steps):
                if criterion == "taylor":
                    _taylor_grads(work, calib_batches, calib_from)
                elif criterion == "hessian":
                    _hessian_grads(work, calib_batches, calib_from, names)
                pruner.step()
    work.zero_grad(set_to_none=True)
    got = {n: conv1[n].out_channels for n in targets}
    if got != targets:
        raise RuntimeError(f"Torch-Pruning produced widths {got}, expected {targets}")
    for name, is_out, idxs in pruner.DG.pruning_history():
        block = name.removesuffix(".conv1")
        if not is_out or block not in targets:
            raise RuntimeError(f"unexpected pruning of {name} (out={is_out})")
        drop = {kept[block][i] for i in idxs}
        kept[block] = [c for c in kept[block] if c not in drop]
    net = _rebuild(model, hidden, work.state_dict())
    return (net, kept) if return_kept else net


def prune_to_gamma(
    model: CifarResNet,
    blocks: str | Iterable[str],
    gamma: float,
    criterion: str = "l1",
    calib_batches: Batches | None = None,
    **kwargs,
):
    """:func:`prune_to_shape` at the uniform compression ratio ``gamma`` of ``blocks``."""
    hidden = shape_for_gamma(model.arch, blocks, gamma)
    return prune_to_shape(model, hidden, criterion, calib_batches, blocks=blocks, **kwargs)


# --------------------------------------------------------------------------------------------
# Reference L1 without Torch-Pruning
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def prune_l1_manual(model: CifarResNet, hidden: Shape, return_kept: bool = False):
    """L1 pruning by hand: keep, per changed block, the ``w`` channels of ``conv1`` with the
    largest ``sum |W|`` (in their original order) and slice ``conv1`` out / ``bn1`` / ``conv2``
    in accordingly. Same result as Torch-Pruning's iterative L1 (no fine-tuning between steps,
    so the ranking of the surviving channels never changes)."""
    model = _check_model(model)
    targets = changed_blocks(model.arch, hidden)
    kept = {n: list(range(model.arch.hidden[s][b])) for n, (s, b) in _positions(model.arch)}
    if not targets:
        net = _rebuild(model, hidden, model.state_dict())
        return (net, kept) if return_kept else net
    net, keep = prune_to_widths(model, targets, "l1")
    kept.update({n: idx.tolist() for n, idx in keep.items()})
    net.eval()
    return (net, kept) if return_kept else net


def _positions(arch) -> list[tuple[str, tuple[int, int]]]:
    return [(n, block_position(n)) for n in block_names(arch)]


# --------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------


def pruning_curve(
    model: CifarResNet,
    blocks: str | Iterable[str],
    gammas: Iterable[float],
    criteria: Iterable[str],
    eval_fn: Callable[[CifarResNet], float],
    calib_batches: Batches | None = None,
    *,
    steps: int = 5,
    seed: int = 0,
    cache_prefix: bool = True,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Accuracy of ``model`` pruned (no fine-tuning) at every ``gamma`` by every criterion.

    ``eval_fn(net) -> accuracy (%)`` (for example a :class:`CachedEval`). Returns one row per
    (criterion, gamma): ``criterion, gamma, acc, params`` plus ``widths`` (the pruned blocks'
    hidden widths) and ``seconds`` (pruning + evaluation). ``log`` is called with each row.
    """
    from metamorph.utils.profile import count_params

    model = _check_model(model).eval()
    names = resolve_blocks(model.arch, blocks)
    criteria = list(criteria)
    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown:
        raise ValueError(f"unknown pruning criteria {unknown}; choose from {CRITERIA}")
    calib, calib_from = (list(calib_batches) if calib_batches else None), None
    if calib and cache_prefix and any(c in NEEDS_DATA for c in criteria):
        calib_from = names[0]
        with torch.no_grad():
            calib = [(forward_to(model, calib_from, x), y) for x, y in calib]
    rows: list[dict] = []
    full_acc: float | None = None
    for crit in criteria:
        for g in gammas:
            t0 = time.time()
            hidden = shape_for_gamma(model.arch, names, float(g))
            if hidden == model.arch.hidden and full_acc is not None:
                net, acc = model, full_acc
            else:
                net = prune_to_shape(
                    model,
                    hidden,
                    crit,
                    calib if crit in NEEDS_DATA else None,
                    blocks=names,
                    steps=steps,
                    seed=seed,
                    calib_from=calib_from,
                )
                acc = float(eval_fn(net))
                if hidden == model.arch.hidden:
                    full_acc = acc
            row = {
                "criterion": crit,
                "gamma": round(float(g), 6),
                "acc": acc,
                "params": count_params(net),
                "widths": [hidden[s][b] for s, b in map(block_position, names)],
                "seconds": round(time.time() - t0, 3),
            }
            rows.append(row)
            if log is not None:
                log(row)
    return rows


# --------------------------------------------------------------------------------------------
# Command line: one curve CSV
# --------------------------------------------------------------------------------------------

CURVE_FIELDS = [
    "criterion",
    "gamma",
    "acc",
    "params",
    "widths",
    "seconds",
    "blocks",
    "model",
    "split",
    "images",
]


def parse_gammas(text: str) -> list[float]:
    """``"0,0.25,0.5"`` or ``"start:stop:step"`` (stop included) -> ratios."""
    if ":" in text:
        a, b, s = (float(v) for v in text.split(":"))
        n = int(round((b - a) / s))
        return [round(a + i * s, 6) for i in range(n + 1)]
    return [float(v) for v in text.split(",") if v.strip()]


def read_curve_csv(path) -> list[dict]:
    import csv
    import json

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["gamma"] = float(r["gamma"])
        r["acc"] = float(r["acc"]) if r.get("acc") not in (None, "") else None
        r["params"] = int(r["params"]) if r.get("params") else None
        if r.get("widths"):
            r["widths"] = json.loads(r["widths"])
    return rows


def write_curve_csv(rows: list[dict], path, merge: bool = False) -> list[dict]:
    """Write rows (``merge``: keep existing rows of other (criterion, gamma) pairs)."""
    import csv
    import json
    from pathlib import Path

    path = Path(path)
    if merge and path.exists():
        new = {(r["criterion"], round(float(r["gamma"]), 6)) for r in rows}
        old = [r for r in read_curve_csv(path) if (r["criterion"], round(r["gamma"], 6)) not in new]
        rows = old + list(rows)
    order = {c: i for i, c in enumerate(CRITERIA)}
    rows = sorted(rows, key=lambda r: (order.get(r["criterion"], 99), float(r["gamma"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(
                {**r, "widths": json.dumps(r.get("widths")) if r.get("widths") is not None else ""}
            )
    tmp.replace(path)
    return rows


def load_eval_data(root: str, name: str = "cifar10", test_subset: int | None = None, seed: int = 0):
    """A CIFAR data module with every training image available (no validation carve-out)."""
    from metamorph.data import CIFARDataModule

    dm = CIFARDataModule(root=root, name=name, val_size=0, seed=seed, test_subset=test_subset)
    dm.setup()
    return dm


def model_batches(dm, net, split, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized batches of ``split`` (a name or an ``(x, y)`` pair) as ``net`` expects them."""
    dm.set_normalization(net.arch.mean, net.arch.std)
    return list(dm.normalized_batches(split, batch_size=batch_size))


def run_curve(
    model: CifarResNet,
    dm,
    blocks,
    gammas,
    criteria,
    *,
    calib_batches: int = 10,
    calib_batch_size: int = 128,
    eval_batch_size: int = 1000,
    seed: int = 0,
    steps: int = 5,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """:func:`pruning_curve` on ``dm``'s test split, Taylor/Hessian calibrated on ``calib_batches``
    seeded training batches, the unchanged prefix computed once."""
    names = resolve_blocks(model.arch, blocks)
    test = model_batches(dm, model, "test", eval_batch_size)
    eval_fn = CachedEval(model, test, start=names[0])
    del test
    calib = None
    if any(c in NEEDS_DATA for c in criteria):
        subset = dm.subset("train", calib_batches * calib_batch_size, seed=seed)
        calib = model_batches(dm, model, subset, calib_batch_size)
    n_images = sum(len(y) for _, y in eval_fn.feats)
    extra = {"blocks": ",".join(names), "split": "test", "images": n_images}

    def _log(row):
        row.update(extra)
        if log is not None:
            log(row)

    return pruning_curve(
        model, names, gammas, criteria, eval_fn, calib, steps=steps, seed=seed, log=_log
    )


def curve_to_csv(
    model: str,
    data_root: str,
    out: str,
    *,
    dataset: str = "cifar10",
    test_subset: int | None = None,
    blocks: Sequence[str] | str = ("layer3.2",),
    criteria: Sequence[str] = CRITERIA,
    gammas: str = "0:0.95:0.05",
    calib_batches: int = 10,
    calib_batch_size: int = 128,
    eval_batch_size: int = 1000,
    steps: int = 5,
    seed: int = 0,
    threads: int = 1,
    merge: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Accuracy vs gamma without fine-tuning of ``model``'s ``blocks`` for every criterion, on
    the test split, written to the CSV ``out`` (rows of other criteria / gammas kept with
    ``merge``); returns the summary (``metamorph-prune-curve``)."""
    from metamorph.runtime.networks import load_any_model

    bad = [c for c in criteria if c not in CRITERIA]
    if bad:
        raise ValueError(f"unknown pruning criteria {bad}; choose from {list(CRITERIA)}")
    torch.set_num_threads(max(1, int(threads)))
    t0 = time.time()
    net = load_any_model(model)
    dm = load_eval_data(data_root, dataset, test_subset, seed)
    blocks = "all" if blocks in ("all", ["all"]) else list(blocks)

    def log_row(row):
        log(
            f"{row['criterion']:>8} gamma={row['gamma']:.2f} widths={row['widths']} "
            f"acc={row['acc']:.2f}% params={row['params']:,} ({row['seconds']:.1f}s)"
        )

    rows = run_curve(
        net,
        dm,
        blocks,
        parse_gammas(str(gammas)),
        list(criteria),
        calib_batches=calib_batches,
        calib_batch_size=calib_batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        steps=steps,
        log=log_row,
    )
    for r in rows:
        r["model"] = str(model)
    write_curve_csv(rows, out, merge=merge)
    return {"csv": str(out), "rows": len(rows), "time_s": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    """``python -m metamorph.baselines.pruning --model ... --data-root ... --out ...``: the older
    spelling of ``metamorph-prune-curve src=... data_root=... out=...``, kept because the
    results docs quote it."""
    import argparse
    import json
    import os

    ap = argparse.ArgumentParser(
        prog="python -m metamorph.baselines.pruning",
        description="Alias of metamorph-prune-curve: prune a model's blocks' hidden channels (no "
        "fine-tuning) at every gamma and criterion; test accuracy to a CSV.",
    )
    ap.add_argument("--model", required=True, help="model file (.json) of a CifarResNet")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--blocks", nargs="+", default=["layer3.2"], help="block names or 'all'")
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    ap.add_argument("--gammas", default="0:0.95:0.05", help="'a,b,c' or 'start:stop:step'")
    ap.add_argument("--calib-batches", type=int, default=10)
    ap.add_argument("--calib-batch-size", type=int, default=128)
    ap.add_argument("--eval-batch-size", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", required=True, help="CSV path")
    ap.add_argument("--merge", action="store_true", help="keep rows of other criteria/gammas")
    a = vars(ap.parse_args(argv))
    summary = curve_to_csv(
        a.pop("model"), a.pop("data_root"), a.pop("out"), log=lambda m: print(m, flush=True), **a
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
