"""``metamorph-prune-curve`` (Hydra) and its older spelling ``python -m
metamorph.baselines.pruning`` (argparse) run the same curve and write the same CSV."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import compose_config

import metamorph
from metamorph.baselines import pruning
from metamorph.cli import prune_curve

torch.set_num_threads(1)


def rows(path):
    with open(path) as fh:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]


def test_console_script_and_alias_write_the_same_curve(isolated_env, capsys):
    torch.manual_seed(0)
    model = metamorph.io.save_model(
        metamorph.create_model("resnet20", blocks_per_stage=1), isolated_env / "m"
    )
    common = dict(src=str(model), data_root="embedded:cifar10-mini", test_subset=40)
    hydra_csv, alias_csv = isolated_env / "hydra.csv", isolated_env / "alias.csv"
    cfg = compose_config(
        "prune_curve",
        isolated_env,
        [f"{k}={v}" for k, v in common.items()]
        + [f"out={hydra_csv}", "criteria=[l1,taylor]", "gammas='0.25,0.5'", "calib_batches=1"]
        + ["blocks=[layer3.0]"],
    )
    s = prune_curve.run(cfg)
    assert s["rows"] == 4 and s["csv"] == str(hydra_csv)
    pruning.main(
        ["--model", str(model), "--data-root", "embedded:cifar10-mini", "--test-subset", "40"]
        + ["--out", str(alias_csv), "--criteria", "l1", "taylor", "--gammas", "0.25,0.5"]
        + ["--calib-batches", "1", "--blocks", "layer3.0"]
    )
    got = rows(hydra_csv)
    assert got == rows(alias_csv)
    assert {(r["criterion"], float(r["gamma"])) for r in got} == {
        (c, g) for c in ("l1", "taylor") for g in (0.25, 0.5)
    }
    assert "gamma=0.50" in capsys.readouterr().out


def test_unknown_criterion_is_a_clear_error(isolated_env):
    with pytest.raises(ValueError, match=r"unknown pruning criteria \['l3'\]; choose from"):
        pruning.curve_to_csv("m.json", "embedded:cifar10-mini", "x.csv", criteria=["l3"])
