"""NN-Factory's baselines at the same device budget, through the same search and measurement.

- **random masks** (:func:`random_candidates`): seeded uniformly random module masks at a given
  sparsity (by default NN-Factory's chosen one), searched exactly like G's proposals (predictor,
  proxy ranking, end-to-end measurement): what G adds over chance;
- **task-agnostic masks** (:func:`agnostic_candidates`): G with its task input zeroed, ranked on
  proxy images of every class, so one network per budget serves every task (classifier rows cut
  to the task): what conditioning on the task adds;
- **Torch-Pruning of the full network** (:func:`prune_to_budget`): the fine-tuned base network
  (not the supernet) pruned uniformly (every block's hidden channels, Torch-Pruning L1 by
  default) to the widest shape whose predicted and measured latency fit, then optionally a short
  fine-tune on the task's training images with the classifier cut to the task
  (:func:`task_finetune`), whose wall time is its per-task cost.

Every baseline returns its model, its :class:`~metamorph.devices.Option` (predicted and measured
figures) and its wall time, like :func:`metamorph.methods.nnfactory.customize.customize`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from metamorph.baselines.pruning import prune_to_shape, shape_for_gamma
from metamorph.devices import Budget, LatencyPredictor, Option, estimate_memory, measure_model
from metamorph.devices import select_within_budget as select
from metamorph.methods.nnfactory.assembler import modules_on
from metamorph.methods.nnfactory.class_tasks import Task, filter_to_task
from metamorph.methods.nnfactory.customize import Candidate, candidates_for
from metamorph.methods.nnfactory.factory import Factory
from metamorph.methods.nnfactory.supernet import arch_costs, random_mask
from metamorph.models.resnet_cifar import CifarResNet
from metamorph.models.subnet import hidden_arch


def random_candidates(
    num_modules: int, sparsities, per_sparsity: int = 3, seed: int = 0
) -> list[Candidate]:
    """``per_sparsity`` seeded uniformly random masks at each sparsity (duplicates dropped)."""
    out, seen = [], set()
    for s in sparsities:
        s = float(s)
        modules_on(num_modules, s)  # range check
        rng = np.random.default_rng([int(seed), int(round(s * 1000))])
        for k in range(per_sparsity):
            mask = random_mask(num_modules, s, rng)
            if mask not in seen:
                seen.add(mask)
                out.append(Candidate(s, mask, f"random{k}"))
    return out


@contextlib.contextmanager
def task_input_off(factory: Factory) -> Iterator[Factory]:
    """The factory's G with its task input zeroed (the "G without the task" ablation at
    inference: the masks depend on the sparsity only)."""
    was = factory.assembler.use_task
    factory.assembler.use_task = False
    try:
        yield factory
    finally:
        factory.assembler.use_task = was


def agnostic_candidates(
    factory: Factory, sparsities, per_sparsity: int = 3, seed: int = 0
) -> list[Candidate]:
    """G's masks with the task input zeroed, at every sparsity (see :func:`task_input_off`)."""
    with task_input_off(factory):
        cands = candidates_for(
            factory, tuple(range(factory.assembler.num_classes)), sparsities, per_sparsity, seed
        )
    for c in cands:
        c.source = "agnostic" + c.source[1:]  # "G+noise1" -> "agnostic+noise1"
    return cands


def all_classes(factory: Factory) -> Task:
    """The "task" of a task-agnostic network: every class (its classifier is cut per task)."""
    return tuple(range(factory.supernet.arch.num_classes))


def restrict_classifier(model: CifarResNet, task: Task) -> CifarResNet:
    """A copy of ``model`` whose classifier keeps only the task's rows (its logits are the
    restricted ones, in the task's order)."""
    arch = copy.deepcopy(model.arch)
    arch.num_classes = len(task)
    rows = torch.as_tensor(list(task), dtype=torch.long)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][rows], state["fc.bias"][rows]
    out = CifarResNet(arch)
    out.load_state_dict(state)
    return out.to(model.fc.weight.device).eval()


def prune_to_budget(
    model: CifarResNet,
    budget: Budget,
    gammas=None,
    criterion: str = "l1",
    calib_batches=None,
    predictor=None,
    measure: Callable[[torch.nn.Module], object] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[CifarResNet, Option, float]:
    """``model`` pruned uniformly (every block's hidden channels at ``1 - gamma`` of its width,
    :func:`metamorph.baselines.pruning.prune_to_shape`, Torch-Pruning ``criterion``) at the
    smallest ``gamma`` of the grid whose predicted and measured costs fit ``budget``. Returns
    ``(pruned, option, seconds)``; :class:`~metamorph.devices.BudgetError` if no gamma fits."""
    t0 = time.perf_counter()
    gammas = [round(0.025 * i, 3) for i in range(39)] if gammas is None else list(gammas)
    profile = budget.profile if budget.needs_device else None
    res = profile.resolution if profile is not None else 32
    options = []
    for g in gammas:
        hidden = shape_for_gamma(model.arch, "all", float(g))
        arch = hidden_arch(model.arch, hidden)
        c = arch_costs(arch, res)
        options.append(Option(f"gamma{g:g}", (float(g), hidden, arch), c["params"], c["flops"]))
    if budget.max_latency_ms is not None and predictor is None:
        predictor = LatencyPredictor(profile, log=log)
    if budget.max_latency_ms is not None and hasattr(predictor, "ensure"):
        predictor.ensure([o.item[2] for o in options])
    cache: dict[float, CifarResNet] = {}

    def pruned(o: Option) -> CifarResNet:
        g, hidden, _ = o.item
        if g not in cache:
            cache[g] = prune_to_shape(model, hidden, criterion, calib_batches).eval()
        return cache[g]

    def score(within: list[Option]) -> None:
        for o in within:  # the widest feasible shape first
            o.score = float(o.flops)

    best = select(
        options,
        budget,
        predict=lambda o: predictor.predict(o.item[2]),
        memory=lambda o: estimate_memory(CifarResNet(o.item[2]), profile.input_shape).peak_mb,
        measure=lambda o: (measure or (lambda m: measure_model(m, profile)))(pruned(o)),
        score=score,
        log=log,
        what="pruned network",
    )
    return pruned(best), best, time.perf_counter() - t0


def task_finetune(
    model: CifarResNet,
    dm,
    task: Task,
    steps: int = 100,
    batch_size: int = 64,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> tuple[CifarResNet, dict]:
    """A copy of ``model`` with its classifier cut to ``task``, fine-tuned ``steps`` SGD steps
    (cosine learning rate, crop+flip augmentation, BN in training mode) on the train split's
    images of the task's classes. Returns ``(model, {"steps", "seconds", "loss"})``."""
    if steps < 0:
        raise ValueError(f"fine-tune steps={steps} must be >= 0")
    t0 = time.perf_counter()
    net = restrict_classifier(model, task)
    x_all, y_all = dm.split_tensors("train")
    x_all, y_all = filter_to_task(x_all, y_all, task)
    if len(y_all) == 0:
        raise ValueError("the train split holds no image of the task's classes")
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    net.requires_grad_(True).train()
    loss_ema = None
    for step in range(int(steps)):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        idx = torch.randint(len(y_all), (batch_size,), generator=g)
        x = dm.transform_batch(x_all[idx], augment=True, generator=g)
        loss = F.cross_entropy(net(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
    net.eval().requires_grad_(False)
    return net, {"steps": int(steps), "seconds": time.perf_counter() - t0, "loss": loss_ema}
