"""Fitness of genotypes: accuracy on the search set (no retraining) plus analytic FLOPs, for
whole populations, sequentially or in parallel joblib (loky) worker processes.

Each evaluator is pickled once to a payload file; each worker process loads it on first use and
keeps it in a per-process cache (with its own working copy of the network, masks and Tucker
decompositions), so a worker loads the model once for the whole search.
"""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metamorph.models import metrics
from metamorph.models.metrics import tensor_batches
from metamorph.search.lowrank import TuckerCache, set_submodule
from metamorph.search.prune import ChannelMasks, prune_physical
from metamorph.search.spaces import DecompositionSpace, MetamorphSpace, PruningSpace, Space


def top1(logits_fn, x: torch.Tensor, y: torch.Tensor, batch_size: int, device=None) -> float:
    """Top-1 accuracy in percent of ``logits_fn`` over ``(x, y)`` in batches; batches are moved
    to ``device`` (default: where ``x`` is)."""
    return metrics.top1(logits_fn, tensor_batches(x, y, batch_size), device)


class Evaluator:
    """Accuracy (%) of a genotype's network on fixed search images, and its analytic FLOPs.

    ``device`` ("cpu", "cuda", "cuda:1") is where the working network and the search images live
    once :meth:`setup` runs (in each worker process); the pickled state stays on the CPU."""

    device: str = "cpu"

    def __init__(self, space: Space, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500):
        self.space = space
        self.x = x.detach().float().cpu().contiguous()
        self.y = y.detach().long().cpu().contiguous()
        self.batch_size = int(batch_size)
        self._ready = False

    # working state is rebuilt in each process
    _transient: tuple[str, ...] = ("_ready",)

    def to(self, device: str | torch.device) -> Evaluator:
        """Evaluate on ``device`` from the next :meth:`setup` on (call before the search)."""
        self.device = str(device)
        self._ready = False
        return self

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in self._transient:
            state.pop(k, None)
        state["_ready"] = False
        return state

    def setup(self) -> None:
        self._ready = True

    def _logits_fn(self, g: np.ndarray):
        raise NotImplementedError

    def accuracy(self, g: np.ndarray) -> float:
        if not self._ready:
            self.setup()
        return top1(
            self._logits_fn(np.asarray(g, dtype=np.float64)),
            self.x,
            self.y,
            self.batch_size,
            None if self.device == "cpu" else self.device,
        )

    def evaluate(self, g: np.ndarray) -> tuple[float, int]:
        return self.accuracy(g), int(self.space.flops(g))

    def build(self, g: np.ndarray) -> nn.Module:
        """The standalone network of ``g`` (for fine-tuning and saving)."""
        raise NotImplementedError


class DecompositionEvaluator(Evaluator):
    """Swaps each conv of a working copy for its cached Tucker-2 layer at the genotype's ranks."""

    _transient = ("_ready", "_work", "_on_device")

    def __init__(
        self,
        model: nn.Module,
        space: DecompositionSpace,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 500,
        iters: int = 0,
    ):
        super().__init__(space, x, y, batch_size)
        self.model = copy.deepcopy(model).eval().cpu()
        self.model.requires_grad_(False)
        self.cache = TuckerCache(self.model, space.layers, iters)

    def setup(self) -> None:
        self._work = copy.deepcopy(self.model).eval().to(self.device)
        self._on_device: dict[tuple[str, int, int], nn.Module] = {}
        self._ready = True

    def layer(self, name: str, r_in: int, r_out: int) -> nn.Module:
        """The (CPU) layer of ``name`` at ranks ``(r_in, r_out)``: the original conv at full rank."""
        c_in, c_out = self.space.channels[name]
        if r_in == c_in and r_out == c_out:
            return self.cache.original(name)
        return self.cache.layer(name, r_in, r_out)

    def _device_layer(self, name: str, r_in: int, r_out: int) -> nn.Module:
        if self.device == "cpu":
            return self.layer(name, r_in, r_out)
        key = (name, int(r_in), int(r_out))
        mod = self._on_device.get(key)
        if mod is None:  # a device copy; the CPU cache (and the base network) stay untouched
            mod = self._on_device[key] = copy.deepcopy(self.layer(name, r_in, r_out)).to(
                self.device
            )
        return mod

    def _logits_fn(self, g):
        for name, (r_in, r_out) in self.space.decode(g).items():
            set_submodule(self._work, name, self._device_layer(name, r_in, r_out))
        return self._work

    def build(self, g: np.ndarray) -> nn.Module:
        net = copy.deepcopy(self.model)
        for name, (r_in, r_out) in self.space.decode(g).items():
            set_submodule(net, name, copy.deepcopy(self.layer(name, r_in, r_out)))
        net.requires_grad_(True)
        return net.eval()


class PruningEvaluator(Evaluator):
    """Masks the pruned hidden channels of a working copy (forward hooks after ``bn1``)."""

    _transient = ("_ready", "_work", "_masks")

    def __init__(
        self,
        model: nn.Module,
        space: PruningSpace,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 500,
    ):
        super().__init__(space, x, y, batch_size)
        self.model = copy.deepcopy(model).eval().cpu()
        self.model.requires_grad_(False)

    def setup(self) -> None:
        self._work = copy.deepcopy(self.model).eval().to(self.device)
        self._masks = ChannelMasks(self._work, self.space.blocks)
        self._ready = True

    def _logits_fn(self, g):
        self._masks.set(self.space.keep(g))
        return self._work

    def build(self, g: np.ndarray) -> nn.Module:
        net = prune_physical(self.model, self.space.keep(g))
        net.requires_grad_(True)
        return net.eval()


class MetamorphEvaluator(Evaluator):
    """Emits the weights of the genotype's shape from a metamorphic checkpoint's INR
    (``module.emit_eval(hidden)``: EMA weights, K-sample averaging) and runs the network on them."""

    _transient = ("_ready", "_emit_cache")

    def __init__(
        self,
        space: MetamorphSpace,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 500,
        ckpt: str | os.PathLike | None = None,
        module=None,
        k: int = 1,
        seed: int = 0,
    ):
        super().__init__(space, x, y, batch_size)
        if ckpt is None and module is None:
            raise ValueError("give the metamorphic checkpoint path or the loaded module")
        self.ckpt = None if ckpt is None else str(ckpt)
        self.module = module
        self.k, self.seed = int(k), int(seed)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if self.ckpt is not None:
            state["module"] = None  # workers reload the checkpoint (weights_only)
        return state

    def setup(self) -> None:
        if self.module is None:
            from metamorph.export.sample import load_metamorphic

            self.module = load_metamorphic(self.ckpt)
        self.module.to(self.device).eval()
        self._ready = True

    def family(self):
        """The checkpoint's sub-network family (its evaluation emission at ``k``, ``seed``)."""
        return self.module.subnet_family(k=self.k, seed=self.seed)

    @torch.no_grad()
    def _logits_fn(self, g):
        return self.family().forward_fn(self.space.decode(g))

    @torch.no_grad()
    def build(self, g: np.ndarray) -> nn.Module:
        if not self._ready:
            self.setup()
        return self.family().materialize(self.space.decode(g)).eval()


# ------------------------------------------------------------------------------------------
# Population evaluation (sequential or joblib/loky workers)
# ------------------------------------------------------------------------------------------

_WORKER_EVALUATORS: dict[str, Evaluator] = {}


def _worker_evaluate(
    payload: str, key: str, threads: int, genotypes: list[np.ndarray]
) -> list[tuple[float, int]]:
    ev = _WORKER_EVALUATORS.get(key)
    if ev is None:
        torch.set_num_threads(max(1, int(threads)))
        with open(payload, "rb") as fh:
            ev = pickle.load(fh)  # our own payload, written by this run
        ev.setup()
        if len(_WORKER_EVALUATORS) >= 2:  # keep memory bounded across phases
            _WORKER_EVALUATORS.clear()
        _WORKER_EVALUATORS[key] = ev
    return [ev.evaluate(g) for g in genotypes]


class PopulationEvaluator:
    """Evaluates lists of genotypes with ``n_jobs`` loky workers (1: in this process)."""

    def __init__(
        self,
        evaluator: Evaluator,
        n_jobs: int = 1,
        threads_per_worker: int = 1,
        workdir: str | os.PathLike | None = None,
        force_pool: bool = False,
    ) -> None:
        self.evaluator = evaluator
        self.n_jobs = max(1, int(n_jobs))
        self.threads = max(1, int(threads_per_worker))
        self.pool = self.n_jobs > 1 or force_pool
        self.key = uuid.uuid4().hex
        self.payload: Path | None = None
        if self.pool:
            d = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
            d.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="metamorph-search-", suffix=".pkl", dir=d)
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(evaluator, fh, protocol=pickle.HIGHEST_PROTOCOL)
            self.payload = Path(path)
        self.n_evaluated = 0

    def __call__(self, genotypes: list[np.ndarray] | np.ndarray) -> list[tuple[float, int]]:
        genotypes = [np.asarray(g, dtype=np.float64) for g in genotypes]
        if not genotypes:
            return []
        self.n_evaluated += len(genotypes)
        if not self.pool:
            return [self.evaluator.evaluate(g) for g in genotypes]
        from joblib import Parallel, delayed

        # contiguous chunks, a few per worker (balances uneven candidate costs)
        n_chunks = min(len(genotypes), self.n_jobs * 4)
        bounds = np.linspace(0, len(genotypes), n_chunks + 1).astype(int)
        chunks = [genotypes[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        results = Parallel(n_jobs=self.n_jobs, backend="loky")(
            delayed(_worker_evaluate)(str(self.payload), self.key, self.threads, c) for c in chunks
        )
        return [r for chunk in results for r in chunk]

    def close(self) -> None:
        if self.payload is not None and self.payload.exists():
            self.payload.unlink()
        self.payload = None

    def __enter__(self) -> PopulationEvaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
