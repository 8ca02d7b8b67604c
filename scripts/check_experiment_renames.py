"""Prove that every regrouped experiment composes as its old name did.

Each experiment file's ``# was: <old name> [overrides]`` header names the file it replaced. This
script composes the old name from the configs of an earlier commit and the new name from the
current ``metamorph/conf``, with the same fixed paths, and compares the two configs key by key
as written (interpolations unresolved, plus ``hydra.run`` / ``hydra.sweep``) and resolved.

    python scripts/check_experiment_renames.py                 # old experiment files, current groups
    python scripts/check_experiment_renames.py --whole-tree    # the old commit's whole conf/

The default isolates the experiment files: the old commit's ``conf/experiment/`` is put in place
of the current experiment groups, so changes other work made to the primaries or the other groups
do not show. ``--whole-tree`` composes the old name against everything as it was at the commit.
Exit status 1 if any experiment differs; the last line of stdout is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from metamorph.config.experiments import GROUPS, list_experiments
from metamorph.config.locations import CONF_DIR

BEFORE = "200481fbd91c79f900efcbe47e96a8eacd1ec4d3"  # the last commit before the regrouping
PATHS = ["paths.root_dir=/ROOT", "paths.output_dir=/OUT"]


def old_conf(commit: str, dest: Path, whole_tree: bool) -> Path:
    """The conf dir to compose old names in: the commit's conf/ or its experiments on ours."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", commit, "conf"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    if whole_tree:
        return dest / "conf"
    mixed = dest / "mixed"
    shutil.copytree(CONF_DIR, mixed)
    for group in GROUPS:
        shutil.rmtree(mixed / group, ignore_errors=True)
    shutil.copytree(dest / "conf" / "experiment", mixed / "experiment")
    return mixed


def composed(conf: Path, primary: str, overrides: list[str]) -> dict:
    """The composed config as written (interpolations unresolved) and resolved."""
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(primary, overrides=PATHS + overrides, return_hydra_config=True)
    out = OmegaConf.to_container(cfg, resolve=False)
    hydra = out.pop("hydra")
    out["hydra"] = {"run": hydra["run"], "sweep": hydra["sweep"]}
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # noqa: BLE001 - an unresolvable config compares by its error
        resolved = f"unresolvable: {err}"
    return {"as_written": out, "resolved": resolved}


def differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(f"{key}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
            else:
                out += differences(a[k], b[k], key)
        return out
    return [] if a == b and type(a) is type(b) else [f"{prefix}: {a!r} -> {b!r}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=BEFORE, help="commit whose conf/ holds the old names")
    ap.add_argument(
        "--whole-tree", action="store_true", help="compose old names in its whole conf/"
    )
    args = ap.parse_args(argv)
    exps = [e for e in list_experiments() if e.was[0]]
    differ, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        conf = old_conf(args.before, Path(tmp), args.whole_tree)
        for e in exps:
            old, extra = e.was
            # on the current groups the search primary has no ``experiment`` slot: append one where
            # the old search.yaml had it (last in its defaults list)
            slot = "+experiment" if e.primary == "search" and not args.whole_tree else "experiment"
            before = composed(conf, e.primary, [f"{slot}={old}", *extra])
            after = composed(Path(CONF_DIR), e.primary, [e.override])
            diff = differences(before, after)
            results.append({"old": old, "new": e.override, "extra": extra, "differences": diff})
            status = "identical" if not diff else f"{len(diff)} difference(s)"
            print(f"{old:60s} -> {e.override}: {status}")
            for d in diff:
                print(f"    {d}")
            if diff:
                differ.append(e.override)
    summary = {
        "before": args.before,
        "whole_tree": args.whole_tree,
        "compared": len(results),
        "identical": len(results) - len(differ),
        "differ": differ,
    }
    print(json.dumps(summary))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
