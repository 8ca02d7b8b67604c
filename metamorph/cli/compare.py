"""``metamorph-compare``: every method's points on one table and two charts (see
:mod:`metamorph.compare`).

    metamorph-compare comparison=resnet20_cifar10_cpu1_b1
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from metamorph.config.locations import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="compare")
def main(cfg: DictConfig) -> None:
    from metamorph.compare import ComparisonError, run_comparison
    from metamorph.runtime.summary import print_summary

    try:
        s = run_comparison(cfg)
    except (ComparisonError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"metamorph-compare: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    md = next(f for f in s["files"] if f.endswith("comparison.md"))
    print(Path(md).read_text())
    print(
        f"  {s['points']} points, {s['missing']} methods missing; wrote {len(s['files'])} files to {s['out_dir']}"
    )
    print_summary(s)


if __name__ == "__main__":
    main()
