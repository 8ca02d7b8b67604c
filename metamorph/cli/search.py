"""``metamorph-search``: GeneCAI-style genetic search for per-layer compression.

``search=genecai`` (default): decomposition search -> fine-tune -> pruning search -> fine-tune
of chosen front points, on a pretrained network (``base=``, a model file or an akamaster
checkpoint). ``search=metamorph``: a search over the per-block widths (and stage depths) of a
metamorphic checkpoint (``ckpt=``). Writes the evaluations and fronts (CSV), the fine-tuned
front models (safetensors + JSON), a uniform-L1 baseline at matching FLOPs and a plot of
accuracy vs FLOPs to the run folder; the last line of stdout is a one-line JSON summary.

    metamorph-search base=outputs/models/resnet56_ft.json data=cifar10 data.root=...
    metamorph-search search=metamorph ckpt=outputs/runs/.../metamorph.ckpt
    metamorph-search search_experiment=genecai/paper/resnet56_cifar10 search.algorithm=scalar
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from metamorph.cli.entry import entry_point
from metamorph.config.schema import typed
from metamorph.runtime.data import build_datamodule
from metamorph.runtime.device import resolve_device
from metamorph.runtime.search_methods import get_search_method
from metamorph.runtime.summary import print_summary


def run(cfg: DictConfig, log=print) -> dict:
    from metamorph.search.config import SearchConfig
    from metamorph.search.pipeline import format_table, run_pipeline

    t0 = time.time()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    scfg: SearchConfig = typed(SearchConfig, cfg.search, "search")
    device = resolve_device(str(cfg.get("device", "cpu")))
    seed = int(cfg.seed)
    torch.manual_seed(seed)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = get_search_method(scfg.method).load_source(cfg)
    arch = source.arch
    dm = build_datamodule(cfg.data, mean=arch.mean, std=arch.std, seed=seed)
    dm.setup("fit")
    if dm.num_classes != arch.num_classes:
        raise ValueError(
            f"the network has {arch.num_classes} classes but {cfg.data.name} has {dm.num_classes}"
        )
    summary = run_pipeline(scfg, dm, out, source, seed=seed, log=log, device=device)
    summary["source"] = source.label
    summary["device"] = str(device)
    summary["output_dir"] = str(out)
    log("")
    log(format_table(summary))
    summary["time_s"] = round(time.time() - t0, 1)
    return summary


@entry_point("metamorph-search", "search", tee_log=True, extra_errors=(ImportError,))
def main(cfg: DictConfig) -> None:
    summary = run(cfg)  # the user's errors: one line, exit status 2 (metamorph.cli.entry)
    print(
        f"  front: {summary['files']['front']}\n  plot:  {summary['files']['plot']}\n"
        f"  time:  {summary['time_s']} s"
    )
    print_summary(summary)


if __name__ == "__main__":
    main()
