"""``metamorph-compare``: every method's points on one table, accuracy vs FLOPs and accuracy vs
measured latency, and a cost table (package metamorph.compare).

    metamorph-compare comparison=resnet20_cifar10_cpu1_b1
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from metamorph.cli.entry import entry_point


@entry_point("metamorph-compare", "compare", tee_log=True)
def main(cfg: DictConfig) -> None:
    from metamorph.compare import run_comparison
    from metamorph.runtime.summary import print_summary

    s = run_comparison(cfg)  # user errors: one line, exit 2 (cli.entry)
    md = next(f for f in s["files"] if f.endswith("comparison.md"))
    print(Path(md).read_text())
    print(
        f"  {s['points']} points, {s['missing']} methods missing; "
        f"wrote {len(s['files'])} files to {s['out_dir']}"
    )
    print_summary(s)


if __name__ == "__main__":
    main()
