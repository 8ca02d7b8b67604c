"""``metamorph-customize``: a model for a task and a device budget, from a trained method's
artefact, in seconds and without training (dispatched by ``method``: nnfactory, ...).

    metamorph-customize method=nnfactory nnfactory.factory=<run>/factory.json task=[cat,dog,truck] budget.max_latency_ms=0.5 device=cpu1_b1

``task=[...]`` is the same as ``classes=[...]``: Hydra reserves ``task`` for the config group of
metamorph-train, so the command line's ``task=`` is renamed before Hydra sees it.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from metamorph.cli.entry import entry_point


@entry_point("metamorph-customize", "customize")
def _main(cfg: DictConfig) -> dict:
    from metamorph.runtime.customizers import get_customizer
    from metamorph.runtime.summary import report

    summary = get_customizer(str(cfg.method))(cfg)
    report(summary)
    return summary


def task_alias(argv: list[str]) -> list[str]:
    """``task=...`` (the user's word for the class set) -> ``classes=...``."""
    return ["classes=" + a[len("task=") :] if a.startswith("task=") else a for a in argv]


def main():
    sys.argv[1:] = task_alias(sys.argv[1:])
    return _main()


main.task = _main.task

if __name__ == "__main__":
    main()
