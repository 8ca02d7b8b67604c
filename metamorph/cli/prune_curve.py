"""``metamorph-prune-curve``: accuracy vs compression ratio of a pretrained network pruned
without fine-tuning (L1, L2, random, Taylor, Hessian channel criteria), on the test split, to a
CSV: the pruning baselines of NeuMeta's figures.

(``python -m metamorph.baselines.pruning --model ... --data-root ... --out ...`` is the older
spelling of the same run.)
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from metamorph.baselines.pruning import curve_to_csv
from metamorph.cli.entry import entry_point
from metamorph.runtime.summary import print_summary


def run(cfg: DictConfig) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True)
    return curve_to_csv(
        c["src"],
        c["data_root"],
        c["out"],
        **{k: c[k] for k in ("dataset", "test_subset", "blocks", "criteria", "gammas")},
        **{k: c[k] for k in ("calib_batches", "calib_batch_size", "eval_batch_size", "steps")},
        **{k: c[k] for k in ("seed", "threads", "merge")},
        log=lambda m: print(m, flush=True),
    )


@entry_point("metamorph-prune-curve", "prune_curve", tee_log=True)
def main(cfg: DictConfig) -> None:
    s = run(cfg)
    print(f"[metamorph-prune-curve] {s['rows']} rows -> {s['csv']} ({s['time_s']} s)")
    print_summary(s)


if __name__ == "__main__":
    main()
