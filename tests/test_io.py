"""Model files (safetensors + JSON), akamaster import, atomic writes and the checkpoint IO."""

from __future__ import annotations

import collections
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn, write_akamaster_checkpoint
from safetensors import safe_open

import metamorph
from metamorph.io import (
    atomic_path,
    atomic_write,
    atomic_write_text,
    load_model,
    read_model_json,
    save_model,
)
from metamorph.io.akamaster import akamaster_to_metamorph, load_untrusted_checkpoint
from metamorph.io.model_file import FORMAT
from metamorph.models import IMAGENET_MEAN, IMAGENET_STD, create_model
from metamorph.runtime.checkpoint_io import AtomicCheckpointIO
from metamorph.runtime.networks import load_any_model

MEAN = (0.5, 0.4, 0.3)
STD = (0.21, 0.22, 0.23)


def _x(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _expected_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = create_model("resnet20", hidden_width=7, shortcut="B", mean=MEAN, std=STD, num_classes=12)
    return randomize_bn(m).eval()


@pytest.fixture
def saved(model, tmp_path):
    json_path = save_model(model, tmp_path / "net", meta={"note": "hello", "acc": 12.5})
    return json_path


# ----------------------------------------------------------------------------------------------
# save_model / load_model
# ----------------------------------------------------------------------------------------------


def test_save_load_roundtrip_bit_identical(model, saved, tmp_path):
    assert saved == tmp_path / "net.json"
    st = tmp_path / "net.safetensors"
    assert saved.is_file() and st.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.json", "net.safetensors"]
    x = _x()
    with torch.no_grad():
        ref = model(x)
    for spec in (saved, st, tmp_path / "net", str(saved)):
        loaded = load_model(spec)
        assert not loaded.training
        sd1, sd2 = model.state_dict(), loaded.state_dict()
        assert list(sd1) == list(sd2)
        for k in sd1:
            assert sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]), k
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)
        assert loaded.arch == model.arch
        assert loaded.meta == {"note": "hello", "acc": 12.5}
    assert isinstance(metamorph.load(saved), type(model))


def test_json_records_architecture_and_normalization(model, saved):
    doc = json.loads(saved.read_text())
    assert doc["format"] == FORMAT == "metamorph.model/v1"
    assert doc["family"] == "cifar_resnet"
    assert doc["arch"]["mean"] == pytest.approx(list(MEAN))
    assert doc["arch"]["std"] == pytest.approx(list(STD))
    assert doc["arch"]["hidden"] == [[7] * 3] * 3 and doc["arch"]["shortcut"] == "B"
    assert doc["arch"]["num_classes"] == 12
    assert read_model_json(saved) == doc
    loaded = load_model(saved)
    assert tuple(loaded.arch.mean) == pytest.approx(MEAN) and tuple(
        loaded.arch.std
    ) == pytest.approx(STD)
    with safe_open(str(saved.with_suffix(".safetensors")), "pt") as f:
        assert f.metadata() == {"format": FORMAT}
        assert set(f.keys()) == set(model.state_dict())


def test_saved_files_get_normal_permissions(saved):
    for p in (saved, saved.with_suffix(".safetensors")):
        assert stat.S_IMODE(p.stat().st_mode) == _expected_mode(), p


def test_overwrite_leaves_no_temp_files(model, saved, tmp_path):
    model2 = create_model("resnet20", hidden_width=3)
    save_model(model2, tmp_path / "net.json")
    assert load_model(saved).arch.hidden == [[3] * 3] * 3
    assert _leftovers(tmp_path) == []


def test_load_uses_no_pickle(saved, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("pickle/torch.load used while loading a model file")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            boom()

    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    loaded = load_model(saved)
    assert loaded.arch.hidden == [[7] * 3] * 3
    with pytest.raises(AssertionError):  # the patch is live
        torch.load(saved)


@pytest.mark.parametrize("keep", ["empty", "8", "header", "half", "minus1"])
def test_truncated_safetensors(saved, keep):
    st = saved.with_suffix(".safetensors")
    data = st.read_bytes()
    n = {"empty": 0, "8": 8, "header": 100, "half": len(data) // 2, "minus1": len(data) - 1}[keep]
    st.write_bytes(data[:n])
    with pytest.raises(ValueError, match="net.safetensors is truncated or corrupt.*re-export"):
        load_model(saved)


def test_corrupt_json(saved):
    saved.write_text(saved.read_text()[:-20])
    with pytest.raises(ValueError, match="net.json is not valid JSON.*corrupt"):
        load_model(saved)


@pytest.mark.parametrize("fmt", ["metamorph.model/v0", None, "lightning"])
def test_wrong_format(saved, fmt):
    doc = json.loads(saved.read_text())
    if fmt is None:
        del doc["format"]
    else:
        doc["format"] = fmt
    saved.write_text(json.dumps(doc))
    with pytest.raises(
        ValueError,
        match=r"not a metamorph model file.*expected 'metamorph.model/v1'.*metamorph-convert",
    ):
        load_model(saved)


def test_missing_files(saved, tmp_path):
    saved.with_suffix(".safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights file .*net.safetensors not found"):
        load_model(saved)
    with pytest.raises(FileNotFoundError, match="architecture file .*other.json not found"):
        load_model(tmp_path / "other.safetensors")


def test_weights_not_matching_architecture(saved):
    doc = json.loads(saved.read_text())
    doc["arch"]["hidden"] = [[7, 7], [7, 7, 7], [7, 7, 7]]  # one block fewer than the weights
    saved.write_text(json.dumps(doc))
    with pytest.raises(
        ValueError, match=r"does not match its architecture.*unexpected \['layer1\.2"
    ):
        load_model(saved)


def test_save_into_missing_folder(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="output directory .*nope does not exist"):
        save_model(model, tmp_path / "nope" / "net")
    assert not (tmp_path / "nope").exists()


# ----------------------------------------------------------------------------------------------
# akamaster import
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [20, 32])
def test_akamaster_import_matches_source(tmp_path, depth, monkeypatch):
    ck = write_akamaster_checkpoint(tmp_path / f"resnet{depth}.th", depth=depth, seed=depth)
    raw = torch.load(ck.path, weights_only=True)
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert (
        "module.linear.weight" in raw["state_dict"] and "module.fc.weight" not in raw["state_dict"]
    )
    assert not any(k.endswith("num_batches_tracked") for k in raw["state_dict"])

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model, best = akamaster_to_metamorph(load_untrusted_checkpoint(ck.path))
    assert calls == [True]
    assert best == 91.0
    assert not model.training
    assert model.arch.depth == depth and model.arch.shortcut == "A" and model.arch.bn
    assert tuple(model.arch.mean) == IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert tuple(model.arch.std) == IMAGENET_STD == (0.229, 0.224, 0.225)
    assert torch.equal(model.fc.weight, ck.source.fc.weight)
    x = _x()
    with torch.no_grad():
        assert torch.equal(model(x), ck.source(x))


def test_akamaster_via_load_any_model_and_save(akamaster_ckpt, tmp_path):
    model = load_any_model(akamaster_ckpt.path)
    json_path = save_model(model, tmp_path / "conv")
    doc = json.loads(json_path.read_text())
    assert doc["arch"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert doc["arch"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    x = _x()
    with torch.no_grad():
        assert torch.equal(load_model(json_path)(x), akamaster_ckpt.source(x))


def test_akamaster_with_num_batches_tracked_and_no_prefix(tmp_path, akamaster_ckpt):
    """Variants seen in the wild: no ``module.`` prefix, buffers present."""
    src = akamaster_ckpt.source
    sd = {("linear." + k[3:] if k.startswith("fc.") else k): v for k, v in src.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "plain.th")
    model, best = akamaster_to_metamorph(load_untrusted_checkpoint(tmp_path / "plain.th"))
    assert best is None
    x = _x()
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


class _Custom:
    def __init__(self):
        self.value = 1


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilExec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", ["os_system", "exec", "custom_class", "custom_in_state_dict"])
def test_forbidden_globals_are_refused(tmp_path, payload, akamaster_ckpt):
    marker = tmp_path / "pwned"
    sd = {f"module.{k}": v for k, v in akamaster_ckpt.source.state_dict().items()}
    obj = {
        "os_system": {"state_dict": sd, "best_prec1": _Evil(marker)},
        "exec": {"state_dict": sd, "x": _EvilExec(marker)},
        "custom_class": {"state_dict": sd, "arch": _Custom()},
        "custom_in_state_dict": {"state_dict": {**sd, "module.extra": _Custom()}},
    }[payload]
    path = tmp_path / "evil.th"
    torch.save(obj, path)
    with pytest.raises(ValueError, match="outside the weights-only allow-list and was not loaded"):
        load_untrusted_checkpoint(path)
    with pytest.raises(ValueError, match="allow-list"):
        load_any_model(path)
    assert not marker.exists()


def test_counter_checkpoint_is_not_a_model(tmp_path):
    """torch's weights-only defaults allow ``collections.Counter``; it is still no CIFAR ResNet."""
    path = tmp_path / "counter.th"
    torch.save({"state_dict": collections.Counter(a=1)}, path)
    with pytest.raises(ValueError, match="lacks layerX.Y.conv1.weight"):
        load_any_model(path)


def test_akamaster_structural_errors(tmp_path, akamaster_ckpt):
    raw = torch.load(akamaster_ckpt.path, weights_only=True)
    with pytest.raises(ValueError, match="expected a dict with a 'state_dict' key"):
        akamaster_to_metamorph(raw["state_dict"])
    sd = dict(raw["state_dict"])
    del sd["module.layer2.1.bn1.running_var"]
    with pytest.raises(
        ValueError, match=r"does not match ResNet-20: missing \['layer2.1.bn1.running_var'\]"
    ):
        akamaster_to_metamorph({"state_dict": sd})
    uneven = {k: v for k, v in raw["state_dict"].items() if not k.startswith("module.layer3.2.")}
    with pytest.raises(ValueError, match=r"uneven blocks per stage \[3, 3, 2\]"):
        akamaster_to_metamorph({"state_dict": uneven})


def test_untrusted_checkpoint_missing_and_truncated(tmp_path, akamaster_ckpt):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_untrusted_checkpoint(tmp_path / "missing.th")
    data = akamaster_ckpt.path.read_bytes()
    bad = tmp_path / "truncated.th"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt or not a checkpoint"):
        load_untrusted_checkpoint(bad)


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"previous contents")

    def writer(p: Path) -> None:
        with open(p, "wb") as f:
            f.write(b"half of the new")
            f.flush()
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, writer)
    assert target.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_atomic_write_success_and_text(tmp_path):
    target = tmp_path / "out.txt"
    seen = []

    def writer(p: Path) -> None:
        seen.append(p)
        assert p.parent == tmp_path and p != target and not target.exists()
        p.write_bytes(b"new")

    assert atomic_write(target, writer) == target
    assert target.read_bytes() == b"new"
    assert not seen[0].exists()
    assert stat.S_IMODE(target.stat().st_mode) == _expected_mode()
    atomic_write_text(target, "text")
    assert target.read_text() == "text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with atomic_path(tmp_path / "missing" / "x"):
            raise AssertionError("not reached")
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "x") as tmp:
            tmp.write_text("partial")
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file


# ----------------------------------------------------------------------------------------------
# AtomicCheckpointIO
# ----------------------------------------------------------------------------------------------


def _checkpoint(step: int) -> dict:
    return {
        "global_step": step,
        "state_dict": {"w": torch.arange(6.0).reshape(2, 3) * step, "b": torch.tensor([step])},
        "loops": {"nested": [1, 2.5, "x", None, (3, 4)]},
        "hyper_parameters": {"config": {"lr": 0.1}},
    }


def _assert_checkpoint(loaded: dict, step: int) -> None:
    ref = _checkpoint(step)
    assert loaded["global_step"] == step
    assert torch.equal(loaded["state_dict"]["w"], ref["state_dict"]["w"])
    assert torch.equal(loaded["state_dict"]["b"], ref["state_dict"]["b"])
    assert loaded["loops"] == ref["loops"] and loaded["hyper_parameters"] == ref["hyper_parameters"]


def test_checkpoint_io_roundtrip(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"  # missing folders are created
    io.save_checkpoint(_checkpoint(3), path)
    _assert_checkpoint(io.load_checkpoint(path), 3)
    _assert_checkpoint(torch.load(path, weights_only=True), 3)
    io.save_checkpoint(_checkpoint(4), path)
    _assert_checkpoint(io.load_checkpoint(str(path)), 4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert stat.S_IMODE(path.stat().st_mode) == _expected_mode()
    io.remove_checkpoint(path)
    assert not path.exists()
    io.remove_checkpoint(path)  # no error when already gone
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(_checkpoint(1), path, storage_options={"x": 1})


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty", "evil_pickle"])
def test_checkpoint_io_refuses_corrupt_or_unsafe(tmp_path, kind):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(5), path)
    marker = tmp_path / "pwned"
    data = path.read_bytes()
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"state_dict": {}, "x": _Evil(marker)}, path)
    with pytest.raises(ValueError, match="last.ckpt could not be loaded safely"):
        io.load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="check ckpt_path"):
        io.load_checkpoint(tmp_path / "other.ckpt")


def test_checkpoint_io_interrupted_write_keeps_previous(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(1), path)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        import io as _io

        buf = _io.BytesIO()
        real_save(obj, buf)
        Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("killed half-way")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="killed half-way"):
        io.save_checkpoint(_checkpoint(2), path)
    _assert_checkpoint(io.load_checkpoint(path), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
