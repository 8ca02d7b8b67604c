"""The "Individual" baseline of NeuMeta's Table 2: one network per shape.

Two ways to get one:

* **pruned and fine-tuned** (CPU budget): the pretrained network pruned (L1, no data) to the
  shape, written as a model file, then fine-tuned with the ``task=pretrain`` machinery
  (:func:`metamorph.tasks.classifier.run_pretrain`, whose ``model.init`` points at the pruned
  file), as the registered task ``individual``::

      metamorph-train experiment=baselines/recipe/individual_resnet20_cifar10_cpu task=individual \\
          individual.gamma=0.25 data.root=../shared/data/cifar10-jpeg

  (``task=individual`` is ``task=pretrain`` under its own name; ``python -m
  metamorph.baselines.individual`` with the same arguments minus ``task=`` is the older spelling
  and does the same.)

  The experiment's ``model.init`` is ``${individual.pruned}.json``, so once the pruned file exists
  ``metamorph-train experiment=baselines/recipe/individual_resnet20_cifar10_cpu individual.gamma=0.25`` runs the
  same fine-tune (for example to resume it with ``ckpt_path=...``).
* **trained from scratch** at the paper's budget (GPU):
  ``metamorph-train experiment=baselines/paper/individual_resnet20_cifar10 'model.kwargs.hidden=[[16,16,16],[32,32,32],[64,64,48]]'``.

The ``individual`` config block (top level, set by the ``baselines/*/individual_*`` experiments):
``base`` (model file to prune), ``blocks``, ``gamma`` or an explicit ``hidden`` shape,
``criterion`` (any of :data:`metamorph.baselines.pruning.CRITERIA`; ``taylor`` / ``hessian`` use
``calib_batches`` training batches), ``pruned`` (path prefix of the pruned model file).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from metamorph.baselines.pruning import NEEDS_DATA, prune_to_shape, resolve_blocks, shape_for_gamma
from metamorph.config.locations import CONF_DIR
from metamorph.config.schema import typed
from metamorph.runtime.data import build_datamodule
from metamorph.runtime.networks import load_any_model
from metamorph.runtime.summary import report
from metamorph.runtime.tasks import get_task, register_task


@dataclass
class IndividualConfig:
    base: str = "outputs/models/resnet20_ft.json"
    blocks: list[str] = field(default_factory=lambda: ["layer3.2"])
    gamma: float | None = 0.25
    hidden: list[list[int]] | None = None  # explicit target shape instead of gamma
    criterion: str = "l1"
    pruned: str | None = None  # path prefix of the pruned model file
    calib_batches: int = 10


def target_shape(base, ic: IndividualConfig) -> list[list[int]]:
    if ic.hidden is not None:
        return [list(map(int, s)) for s in ic.hidden]
    if ic.gamma is None:
        raise ValueError("set individual.gamma or individual.hidden")
    return shape_for_gamma(base.arch, ic.blocks, float(ic.gamma))


def prune_for_individual(cfg: DictConfig) -> tuple[Path, dict]:
    """Prune ``individual.base`` to the configured shape and write it to ``individual.pruned``."""
    from metamorph.io.model_file import save_model

    ic: IndividualConfig = typed(IndividualConfig, cfg.get("individual"), "individual")
    if not ic.pruned:
        raise ValueError("individual.pruned (where the pruned model file goes) is not set")
    t0 = time.time()
    base = load_any_model(ic.base)
    blocks = resolve_blocks(base.arch, ic.blocks)
    hidden = target_shape(base, ic)
    calib = None
    if ic.criterion in NEEDS_DATA:
        dm = build_datamodule(cfg.data, mean=base.arch.mean, std=base.arch.std, seed=cfg.seed)
        dm.setup("fit")
        n = ic.calib_batches * dm.batch_size
        calib = list(dm.normalized_batches(dm.subset("train", n, seed=cfg.seed), dm.batch_size))
    net = prune_to_shape(base, hidden, ic.criterion, calib, blocks=blocks, seed=int(cfg.seed))
    meta = {
        "source": str(ic.base),
        "pruned_by": ic.criterion,
        "gamma": ic.gamma if ic.hidden is None else None,
        "blocks": blocks,
    }
    Path(ic.pruned).parent.mkdir(parents=True, exist_ok=True)
    path = save_model(net, ic.pruned, meta=meta)
    info = {
        "criterion": ic.criterion,
        "gamma": meta["gamma"],
        "hidden": hidden,
        "pruned_model": str(path),
        "prune_time_s": round(time.time() - t0, 2),
    }
    return path, info


@register_task("individual")
def run_individual(cfg: DictConfig) -> dict:
    """Prune, then fine-tune the pruned network with the ``pretrain`` task (its ``task.optim`` /
    ``task.scheduler``); writes ``summary.json``. Run as ``metamorph-train
    experiment=<individual experiment> task=individual``."""
    if cfg.task.name not in ("pretrain", "individual"):
        raise ValueError(
            f"the individual baseline fine-tunes with task=pretrain, not {cfg.task.name}"
        )
    t0 = time.time()
    path, info = prune_for_individual(cfg)
    print(f"[individual] pruned {info['criterion']} -> {info['hidden']} : {path}")
    with open_dict(cfg):
        cfg.model.init = str(path)
    summary = get_task("pretrain")(cfg)
    summary.update({"task": "individual", **info})
    summary["time_s"] = round(time.time() - t0, 1)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``python -m metamorph.baselines.individual``: the older spelling of ``metamorph-train ...
    task=individual``, kept because the results docs quote it."""
    summary = run_individual(cfg)
    report(summary)
    return summary.get("val/acc")


if __name__ == "__main__":
    main()
