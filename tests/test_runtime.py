"""The runtime layer's registries: checkpoint kinds (from the file, read once, weights only),
tasks and search methods (a new entry plugs in without any CLI file naming it)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import TINY_DATA, compose_config

import metamorph
from metamorph.runtime import checkpoints as ck
from metamorph.runtime import tasks as rt
from metamorph.runtime.checkpoints import checkpoint_kind, load_checkpoint
from metamorph.runtime.networks import build_model, load_any_model
from metamorph.runtime.registry import Registry
from metamorph.runtime.search_methods import list_search_methods
from metamorph.runtime.summary import plain

torch.set_num_threads(1)


def tiny_net(seed: int = 0):
    torch.manual_seed(seed)
    return metamorph.create_model("resnet20", blocks_per_stage=1).eval()


def same_function(a, b) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture
def pretrain_cfg(isolated_env):
    return compose_config(
        "train",
        isolated_env,
        ["task=pretrain", *TINY_DATA, "+model.kwargs.blocks_per_stage=1"],
    )


def lightning_dict(cfg, net, kind: str | None) -> dict:
    """A Lightning checkpoint of ``task=pretrain`` as ClassifierModule writes it."""
    d = {
        "pytorch-lightning_version": "2.4.0",
        "hyper_parameters": {"config": plain(cfg)},
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
    }
    if kind is not None:
        d["kind"] = kind
    return d


def test_builtin_kinds_tasks_and_methods_are_found_without_importing_them():
    assert set(ck.list_checkpoint_kinds()) >= {
        "akamaster",
        "metamorph",
        "model_file",
        "pretrain",
        "slimmable",
    }
    assert set(rt.list_tasks()) >= {"individual", "metamorph", "pretrain", "slimmable"}
    assert set(list_search_methods()) >= {"genecai", "metamorph"}


def test_model_files_by_suffix_by_prefix_and_by_content(tmp_path):
    net = tiny_net()
    json_path = metamorph.io.save_model(net, tmp_path / "m")
    for p in (json_path, tmp_path / "m.safetensors", tmp_path / "m"):
        assert checkpoint_kind(p) == "model_file"
    renamed = tmp_path / "renamed.ckpt"
    renamed.write_bytes(json_path.read_bytes())
    assert checkpoint_kind(renamed) == "model_file"  # a JSON document, whatever its name
    assert same_function(load_checkpoint(json_path), net)


def test_akamaster_checkpoint_is_sniffed(akamaster_ckpt):
    assert checkpoint_kind(akamaster_ckpt.path) == "akamaster"
    assert same_function(load_checkpoint(akamaster_ckpt.path), akamaster_ckpt.source)


def test_pretrain_checkpoint_with_and_without_kind_field(tmp_path, pretrain_cfg):
    """New checkpoints carry ``kind``; older ones (no field) are recognised by the sniff."""
    net = build_model(pretrain_cfg.model, num_classes=10).eval()
    for kind in ("pretrain", None):
        path = tmp_path / f"{kind}.ckpt"
        torch.save(lightning_dict(pretrain_cfg, net, kind), path)
        assert checkpoint_kind(path) == "pretrain"
        loaded = load_checkpoint(path)
        assert same_function(loaded, net)
        assert same_function(load_any_model(path), net)  # model.init may name one too


def test_modules_write_their_kind(pretrain_cfg):
    from metamorph.config.schema import OptimConfig, SchedulerConfig
    from metamorph.tasks.classifier import ClassifierModule

    module = ClassifierModule(tiny_net(), OptimConfig(), SchedulerConfig())
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    assert ckpt["kind"] == "pretrain"


def test_kind_field_wins_over_sniffing(tmp_path, pretrain_cfg):
    net = build_model(pretrain_cfg.model, num_classes=10)
    d = lightning_dict(pretrain_cfg, net, "pretrain")
    d["hyper_parameters"]["metamorph"] = {}  # would sniff as metamorph without the field
    d["hyper_parameters"]["base_arch"] = {}
    path = tmp_path / "x.ckpt"
    torch.save(d, path)
    assert checkpoint_kind(path) == "pretrain"


def test_unknown_corrupt_missing_and_directory(tmp_path):
    odd = tmp_path / "odd.ckpt"
    torch.save({"weights": torch.zeros(2)}, odd)
    with pytest.raises(ValueError, match="no known kind; known kinds: akamaster, ") as err:
        checkpoint_kind(odd)
    listed = str(err.value).split("known kinds: ")[1].split(", ")
    assert {"metamorph", "pretrain", "slimmable"} <= set(listed) and listed == sorted(listed)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ValueError, match="truncated, corrupt or not a checkpoint"):
        load_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, path)
    with pytest.raises(ValueError, match="allow-list"):
        load_checkpoint(path)
    assert not marker.exists()


def test_the_file_is_read_once(tmp_path, pretrain_cfg, monkeypatch):
    net = build_model(pretrain_cfg.model, num_classes=10)
    path = tmp_path / "p.ckpt"
    torch.save(lightning_dict(pretrain_cfg, net, "pretrain"), path)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    load_checkpoint(path)
    assert len(calls) == 1 and calls[0]["weights_only"] is True


def test_plain_network_loader_refuses_other_kinds(tmp_path, pretrain_cfg, monkeypatch):
    import lightning as L

    d = lightning_dict(pretrain_cfg, build_model(pretrain_cfg.model, num_classes=10), None)
    d["hyper_parameters"].update(slimmable={}, base_arch={})
    path = tmp_path / "s.ckpt"
    torch.save(d, path)
    assert checkpoint_kind(path) == "slimmable"
    real = ck.CHECKPOINT_KINDS.get("slimmable")
    fake = ck.CheckpointKind("slimmable", lambda p, m: L.LightningModule(), real.sniff)
    monkeypatch.setitem(ck.CHECKPOINT_KINDS._entries, "slimmable", fake)
    with pytest.raises(ValueError, match="is a slimmable checkpoint, not a plain network"):
        load_any_model(path)


def test_a_registered_task_runs_through_metamorph_train(pretrain_cfg, monkeypatch):
    from omegaconf import open_dict

    from metamorph.cli import train

    seen = []
    monkeypatch.setattr(rt, "TASKS", Registry("task"))

    @rt.register_task("probe")
    def run_probe(cfg):
        seen.append(cfg.task.name)
        return {"task": "probe", "val/acc": 1.0}

    with open_dict(pretrain_cfg):
        pretrain_cfg.task.name = "probe"
    assert train.run(pretrain_cfg) == {"task": "probe", "val/acc": 1.0}
    assert seen == ["probe"]
    with pytest.raises(ValueError, match="unknown task 'nope'; known: "):
        rt.get_task("nope")


def test_registry_refuses_a_second_entry_of_the_same_name():
    reg: Registry = Registry("thing")
    reg.register("a", object())
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a", object())


def test_task_individual_is_pretrain_under_its_own_name(isolated_env):
    from metamorph.baselines.individual import run_individual

    exp = "experiment=baselines/recipe/individual_resnet20_cifar10_cpu"
    new = compose_config("train", isolated_env, [exp, "task=individual"])
    old = compose_config("train", isolated_env, [exp])
    assert new.task.name == "individual" and old.task.name == "pretrain"
    assert {**new.task, "name": "pretrain"} == dict(old.task)
    assert rt.get_task(new.task.name) is run_individual


def test_run_task_makes_the_export_folder_before_the_task_runs(tmp_path):
    """A run must not train for hours and then fail to write its result into a missing folder."""
    from omegaconf import OmegaConf

    from metamorph.runtime.tasks import TASKS, register_task, run_task

    seen = {}

    def probe(cfg):
        seen["exists"] = Path(cfg.export_to).parent.is_dir()
        return {}

    register_task("test_export_probe")(probe)
    try:
        target = tmp_path / "a" / "b" / "model"
        run_task(
            OmegaConf.create({"task": {"name": "test_export_probe"}, "export_to": str(target)})
        )
        assert seen["exists"]
        (tmp_path / "file").write_text("x")
        bad = OmegaConf.create(
            {"task": {"name": "test_export_probe"}, "export_to": str(tmp_path / "file" / "m")}
        )
        with pytest.raises(ValueError, match="is a file, not a folder"):
            run_task(bad)
    finally:
        TASKS._entries.pop("test_export_probe", None)
