"""The shipped experiments: headers, layout, inheritance rules, the generated index.

Every experiment composing with its primary config (and passing the typed schemas) is tested in
tests/test_configs.py over the same list (metamorph.config.experiments.list_experiments).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metamorph.config.experiments import (
    GROUPS,
    REQUIRED,
    ROLES,
    depth,
    list_experiments,
    read_header,
    renamed_hint,
    renames,
)
from metamorph.config.locations import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = list_experiments()
BY_OVERRIDE = {e.override: e for e in EXPERIMENTS}
ROLE_DIRS = {
    "paper": "paper-row",
    "recipe": "recipe",
    "ablation": "ablation",
    "diagnostic": "diagnostic",
}
SETUP_METHODS = ("quickstart", "finetune")
IDENTITY = ("name", "export_to")  # every file states its own; not part of an ablation's change
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def _by_name(group: str) -> dict:
    return {e.name: e for e in EXPERIMENTS if e.group == group}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_group_has_experiments():
    assert {e.group for e in EXPERIMENTS} == set(GROUPS)
    assert len(EXPERIMENTS) >= 40


@pytest.mark.parametrize("override", sorted(BY_OVERRIDE))
def test_header_is_complete_and_valid(override):
    e = BY_OVERRIDE[override]
    lines = e.path.read_text().splitlines()
    assert lines[0] == "# @package _global_", f"{e.path}: first line must be the package directive"
    missing = [k for k in REQUIRED if not e.header.get(k)]
    assert not missing, f"{e.path}: header lacks {missing}"
    assert e.header["role"] in ROLES, f"{e.path}: role {e.header['role']!r} not one of {ROLES}"
    assert e.header["primary"] == e.primary, f"{e.path}: primary must be {e.primary}"
    cost, result = e.header["cost"], e.header["result"]
    assert cost.startswith("not measured") or DATE.search(cost), f"{e.path}: a cost needs its date"
    assert result.startswith(("not measured", "see docs/")) or re.search(r"\d", result), (
        f"{e.path}: result {result!r} is neither a number nor 'not measured' / 'see docs/...'"
    )


@pytest.mark.parametrize("override", sorted(BY_OVERRIDE))
def test_name_says_method_and_role(override):
    e = BY_OVERRIDE[override]
    parts = e.name.split("/")
    if parts[0] in SETUP_METHODS:
        assert len(parts) == 2 and e.header["role"] == "setup", e.name
    else:
        assert len(parts) == 3, f"{e.name}: expected <method>/<role>/<name>"
        assert ROLE_DIRS.get(parts[1]) == e.header["role"], f"{e.name}: folder and role disagree"


@pytest.mark.parametrize("override", sorted(BY_OVERRIDE))
def test_inheritance_rules(override):
    e = BY_OVERRIDE[override]
    same_group = _by_name(e.group)
    for p in e.parents:
        assert p in same_group, f"{e.name}: parent {p} is not an experiment of {e.group}"
    if e.header["role"] in ("ablation", "diagnostic"):
        assert len(e.parents) == 1, f"{e.name}: an ablation inherits exactly one recipe"
        parent = same_group[e.parents[0]]
        assert parent.header["role"] == "recipe", f"{e.name}: parent {parent.name} is no recipe"
        raw = e.path.read_text()
        defaults = re.search(r"defaults:\n((?:  - .*\n)+)", raw).group(1).split("\n")
        assert [d.strip() for d in defaults if d.strip()] == [
            f"- /{e.group}/{parent.name}",
            "- _self_",
        ], f"{e.name}: defaults must be [<its recipe>, _self_] only"
    else:
        assert depth(e, same_group) <= 2, f"{e.name}: a {e.header['role']} is at most 2 files deep"
        for p in e.parents:
            assert same_group[p].header["role"] in ("recipe", "paper-row"), (e.name, p)


def _leaves(d: dict, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


@pytest.fixture(scope="module")
def recipes_composed() -> dict:
    """The composed config of every recipe that has ablations."""
    wanted = {e.parents[0] for e in EXPERIMENTS if e.header["role"] == "ablation"}
    out = {}
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for name in sorted(wanted):
            cfg = compose("train", overrides=[f"experiment={name}", "paths.root_dir=/r"])
            out[name] = OmegaConf.to_container(cfg, resolve=False)
    return out


def test_ablations_state_only_their_change(recipes_composed):
    ablations = [e for e in EXPERIMENTS if e.header["role"] == "ablation"]
    assert len(ablations) >= 18
    for e in ablations:
        base = recipes_composed[e.parents[0]]
        changed = []
        for path, value in _leaves({k: v for k, v in e.body.items() if k not in IDENTITY}):
            node = base
            for k in path:
                node = node.get(k, "<absent>") if isinstance(node, dict) else "<absent>"
            assert node != value, f"{e.name}: {'.'.join(path)}={value!r} restates its recipe"
            changed.append(path)
        assert changed, f"{e.name}: an ablation must change something"
        assert e.body["name"] != base["name"] and e.body["export_to"] != base["export_to"], (
            f"{e.name}: needs its own name and export_to, or its runs overwrite the recipe's"
        )


def test_run_names_and_exports_are_unique():
    names = [e.body.get("name") for e in EXPERIMENTS]
    assert all(names) and len(set(names)) == len(names), "two experiments share a run name"
    exports = [e.body["export_to"] for e in EXPERIMENTS if e.body.get("export_to")]
    assert len(set(exports)) == len(exports), "two experiments export to the same path"


def test_recommended_recipes_exist_and_are_recipes():
    index = _load_script("experiments_index")
    for key in index.RECOMMENDED:
        assert BY_OVERRIDE[key].header["role"] == "recipe"


def test_committed_index_is_generated():
    index = _load_script("experiments_index")
    committed = (REPO / "docs" / "EXPERIMENTS.md").read_text()
    assert committed == index.render(), (
        "docs/EXPERIMENTS.md is stale: run scripts/experiments_index.py"
    )


def test_old_names_map_to_existing_experiments():
    table = renames()
    assert len(table) >= 39
    assert table["full_resnet20_keepbn_sandwich_sgdconv_cifar10_cpu"] == (
        "experiment=full_network/recipe/keepbn_sandwich_sgdconv_resnet20_cifar10_cpu"
    )
    assert table["genecai_resnet56"] == "search_experiment=genecai/paper/resnet56_cifar10"
    for new in table.values():
        assert new in BY_OVERRIDE


def test_renamed_hint():
    hint = renamed_hint(["data.root=x", "experiment=finetune_resnet20"])
    assert "experiment=finetune/resnet20_cifar10" in hint and "docs/EXPERIMENTS.md" in hint
    assert "search_experiment=genecai/paper/resnet56_cifar10" in renamed_hint(
        ["experiment=genecai_resnet56"]
    )
    assert renamed_hint(["experiment=finetune/resnet20_cifar10", "seed=1"]) is None


def test_read_header_stops_at_the_first_non_comment(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text(
        "# @package _global_\n# role: recipe\n# cost: 1 min (2026-01-01)\nname: x\n# purpose: no\n"
    )
    assert read_header(f) == {"role": "recipe", "cost": "1 min (2026-01-01)"}


def test_search_and_train_groups_are_apart():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises(Exception, match="search_experiment/genecai/paper/resnet56_cifar10"):
            compose(
                "train",
                overrides=["experiment=../search_experiment/genecai/paper/resnet56_cifar10"],
            )
        with pytest.raises(Exception, match="experiment"):
            compose("search", overrides=["experiment=finetune/resnet20_cifar10"])
        with pytest.raises(Exception, match="finetune/resnet20_cifar10"):
            compose("search", overrides=["search_experiment=finetune/resnet20_cifar10"])


def test_every_experiment_named_in_docs_and_code_exists():
    """Commands in the README, the docs, scripts, code and configs name existing experiments."""
    pattern = re.compile(r"(?<![\w.+])(search_experiment|experiment)=(\w[\w/]*)")
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "scripts").glob("*")]
    files += [*(REPO / "metamorph").rglob("*.py"), *(REPO / "metamorph" / "conf").rglob("*.yaml")]
    known = {(e.group, e.name) for e in EXPERIMENTS}
    missing = []
    for f in files:
        if not f.is_file() or f.name == "EXPERIMENTS.md":
            continue
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for group, name in pattern.findall(line):
                prefix = name.endswith("/") and any(k[1].startswith(name) for k in known)
                if (group, name) not in known and not prefix and name != "null":
                    missing.append(f"{f.relative_to(REPO)}:{n}: {group}={name}")
    assert not missing, "unknown experiments named:\n" + "\n".join(missing)


def test_rename_check_reports_every_kind_of_difference():
    check = _load_script("check_experiment_renames")
    a = {"task": {"lr": 1, "blocks": ["all"]}, "name": "x"}
    assert check.differences(a, a) == []
    diff = check.differences(a, {"task": {"lr": 1.0, "blocks": ["all"], "new": 2}, "name": "y"})
    assert diff == ["name: 'x' -> 'y'", "task.lr: 1 -> 1.0", "task.new: '<absent>' -> 2"]


@pytest.mark.slow
def test_every_renamed_experiment_composes_as_before():
    """The whole check (composes 80 configs); needs the git history of the repository."""
    import subprocess

    check = _load_script("check_experiment_renames")
    known = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{check.BEFORE}^{{commit}}"],
        capture_output=True,
    )
    if known.returncode != 0:
        pytest.skip("the commit before the regrouping is not in this checkout")
    assert check.main([]) == 0
