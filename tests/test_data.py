"""Tests of the data layer (offline; synthetic data sets in tmp_path, plus the embedded set)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from metamorph.data import (
    CIFARDataModule,
    DataError,
    default_cache_dir,
    load_cifar,
    load_embedded,
    normalize,
    random_crop_flip,
    sources,
    stratified_indices,
)
from metamorph.data import embedded as embedded_mod

C10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's real cache."""
    monkeypatch.setenv("METAMORPH_CACHE", str(tmp_path / "envcache"))


# ----------------------------------------------------------------------------------------------
# Synthetic data set writers
# ----------------------------------------------------------------------------------------------


def _rand_images(rng, n):
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _to_rows(images_hwc):
    """HWC images -> CIFAR's (N, 3072) rows (R plane, G plane, B plane)."""
    return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)


def write_cifar10_python(root: Path, per_batch=20, n_test=30, protocol=2, seed=0):
    """Fake cifar-10-batches-py (bytes keys like the Python 2 originals); returns expectations."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = _rand_images(rng, per_batch)
        y = [int(v) for v in (np.arange(per_batch) + i) % 10]
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(
                {b"batch_label": b"batch", b"data": _to_rows(x), b"labels": y}, f, protocol=protocol
            )
        train_x.append(x)
        train_y += y
    tx = _rand_images(rng, n_test)
    ty = [int(v) for v in np.arange(n_test) % 10]
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": _to_rows(tx), b"labels": ty}, f, protocol=protocol)
    with open(d / "batches.meta", "wb") as f:
        names = [c.encode() for c in C10]
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=protocol)
    return np.concatenate(train_x), np.array(train_y), tx, np.array(ty)


def write_cifar100_python(root: Path, n_train=200, n_test=100, seed=1):
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x = _rand_images(rng, n)
        fine = [int(v) for v in np.arange(n) % 100]
        coarse = [int(v) for v in (np.arange(n) * 7 + 3) % 20]  # deliberately different
        with open(d / split, "wb") as f:
            pickle.dump(
                {b"data": _to_rows(x), b"fine_labels": fine, b"coarse_labels": coarse},
                f,
                protocol=2,
            )
        out += [x, np.array(fine)]
    with open(d / "meta", "wb") as f:
        pickle.dump(
            {
                b"fine_label_names": [f"fine{i:03d}".encode() for i in range(100)],
                b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)],
            },
            f,
            protocol=2,
        )
    return out


def write_image_folder(root: Path, classes=C10, n_train=3, n_test=2, seed=0):
    """PNG image folders (lossless); returns expected train/test arrays (sorted-class labels)."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, n in (("train", n_train), ("test", n_test)):
        xs, ys = [], []
        for label, cls in enumerate(sorted(classes)):
            cdir = root / split / cls
            cdir.mkdir(parents=True)
            for i in range(n):
                x = _rand_images(rng, 1)[0]
                Image.fromarray(x).save(cdir / f"{i:04d}.png")
                xs.append(x)
                ys.append(label)
        expected[split] = (np.stack(xs), np.array(ys))
    return expected


# ----------------------------------------------------------------------------------------------
# Formats round-trip
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_python_roundtrip(tmp_path, protocol):
    trx, try_, tex, tey = write_cifar10_python(tmp_path / "data", protocol=protocol)
    a = load_cifar(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert a.classes == C10
    assert a.train.images.dtype == np.uint8 and a.train.images.shape == (100, 32, 32, 3)
    assert a.train.labels.dtype == np.int64
    np.testing.assert_array_equal(a.train.images, trx)
    np.testing.assert_array_equal(a.train.labels, try_)
    np.testing.assert_array_equal(a.test.images, tex)
    np.testing.assert_array_equal(a.test.labels, tey)
    # root may also point straight at the batches folder
    b = load_cifar(tmp_path / "data" / "cifar-10-batches-py", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(b.train.images, trx)


def test_cifar100_python_roundtrip_uses_fine_labels(tmp_path):
    trx, try_, tex, tey = write_cifar100_python(tmp_path)
    a = load_cifar(tmp_path, name="cifar100", cache_dir=tmp_path / "cache")
    assert len(a.classes) == 100 and a.classes[5] == "fine005"
    np.testing.assert_array_equal(a.train.images, trx)
    np.testing.assert_array_equal(a.train.labels, try_)
    np.testing.assert_array_equal(a.test.images, tex)
    np.testing.assert_array_equal(a.test.labels, tey)


def test_image_folder_roundtrip(tmp_path):
    classes = ["zebra", "apple", "mango"] + [f"c{i}" for i in range(7)]  # created unsorted
    exp = write_image_folder(tmp_path, classes=classes)
    (tmp_path / "train" / "apple" / "notes.txt").write_text("ignored: not an image")
    # a grayscale image is converted to RGB
    gray = np.random.default_rng(5).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "test" / "zebra" / "9999.png")
    a = load_cifar(tmp_path, cache_dir=tmp_path / "cache")
    assert a.classes == sorted(classes)
    np.testing.assert_array_equal(a.train.images, exp["train"][0])
    np.testing.assert_array_equal(a.train.labels, exp["train"][1])
    np.testing.assert_array_equal(a.test.images[:-1], exp["test"][0])
    np.testing.assert_array_equal(a.test.images[-1], np.repeat(gray[:, :, None], 3, axis=2))
    assert a.test.labels[-1] == sorted(classes).index("zebra")


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def _fail(*args, **kwargs):
    raise AssertionError("decoder called although the cache should have been used")


def test_cache_used_and_invalidated(tmp_path, monkeypatch):
    exp = write_image_folder(tmp_path / "d")
    cache = tmp_path / "cache"
    first = load_cifar(tmp_path / "d", cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    assert not list(cache.glob("*.tmp"))

    with monkeypatch.context() as m:
        m.setattr(sources, "_decode_image", _fail)
        second = load_cifar(tmp_path / "d", cache_dir=cache)
        np.testing.assert_array_equal(second.train.images, first.train.images)
        assert second.classes == first.classes

        # changing a source file must invalidate the cache (so the failing decoder runs)
        changed = tmp_path / "d" / "train" / "cat" / "0001.png"
        new = np.full((32, 32, 3), 7, np.uint8)
        Image.fromarray(new).save(changed)
        st = changed.stat()
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(AssertionError, match="decoder called"):
            load_cifar(tmp_path / "d", cache_dir=cache)

    third = load_cifar(tmp_path / "d", cache_dir=cache)
    idx = C10.index("cat") * 3 + 1
    np.testing.assert_array_equal(third.train.images[idx], new)
    np.testing.assert_array_equal(
        np.delete(third.train.images, idx, 0), np.delete(exp["train"][0], idx, 0)
    )
    assert len(list(cache.glob("*.npz"))) == 2


def test_cache_python_layout_and_env_default(tmp_path, monkeypatch):
    write_cifar10_python(tmp_path / "d")
    monkeypatch.setenv("METAMORPH_CACHE", str(tmp_path / "mc"))
    assert default_cache_dir() == tmp_path / "mc" / "data"
    a = load_cifar(tmp_path / "d")  # default cache dir from the env var
    assert len(list((tmp_path / "mc" / "data").glob("cifar10-python-*.npz"))) == 1
    monkeypatch.setattr(sources, "_load_pickle", _fail)
    b = load_cifar(tmp_path / "d")
    np.testing.assert_array_equal(a.test.images, b.test.images)


def test_corrupt_cache_is_rebuilt(tmp_path):
    write_cifar10_python(tmp_path / "d")
    cache = tmp_path / "cache"
    a = load_cifar(tmp_path / "d", cache_dir=cache)
    (npz,) = cache.glob("*.npz")
    npz.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignoring unreadable data cache"):
        b = load_cifar(tmp_path / "d", cache_dir=cache)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    assert npz.stat().st_size > 1000  # rewritten


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_error_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*data\.root=.*data\.download=true"):
        load_cifar(tmp_path / "nope", cache_dir=tmp_path / "c")


def test_error_unknown_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match="unrecognised data layout") as e:
        load_cifar(tmp_path, cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "train/<class>" in msg and "test/<class>" in msg


def test_error_layout_hint_for_wrong_name(tmp_path):
    write_cifar10_python(tmp_path)
    with pytest.raises(DataError, match="data.name=cifar10"):
        load_cifar(tmp_path, name="cifar100", cache_dir=tmp_path / "c")


def test_error_unknown_name(tmp_path):
    with pytest.raises(DataError, match="unknown data set name 'mnist'.*cifar10"):
        load_cifar(tmp_path, name="mnist")


def test_error_wrong_class_count(tmp_path):
    write_image_folder(tmp_path, classes=["a", "b", "c"])
    with pytest.raises(DataError, match="expected 10 classes for cifar10, found 3"):
        load_cifar(tmp_path, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="expected 100 classes for cifar100, found 3"):
        load_cifar(tmp_path, name="cifar100", cache_dir=tmp_path / "c")


def test_error_corrupt_image_names_file(tmp_path):
    write_image_folder(tmp_path)
    bad = tmp_path / "test" / "dog" / "0000.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="cannot read image") as e:
        load_cifar(tmp_path, cache_dir=tmp_path / "c")
    assert str(bad) in str(e.value)


def test_error_wrong_image_size_names_file(tmp_path):
    write_image_folder(tmp_path)
    big = tmp_path / "train" / "ship" / "0002.png"
    Image.fromarray(np.zeros((40, 33, 3), np.uint8)).save(big)
    with pytest.raises(DataError, match="33x40 pixels") as e:
        load_cifar(tmp_path, cache_dir=tmp_path / "c")
    assert str(big) in str(e.value)


def test_error_train_test_classes_differ(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "test" / "truck").rename(tmp_path / "test" / "lorry")
    with pytest.raises(DataError, match=r"only in train: \['truck'\], only in test: \['lorry'\]"):
        load_cifar(tmp_path, cache_dir=tmp_path / "c")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_rejects_code(tmp_path):
    write_cifar10_python(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, f, protocol=2)
    with pytest.raises(
        DataError, match=r"refusing to unpickle global '(posix|os|nt)\.system'"
    ) as e:
        load_cifar(tmp_path, cache_dir=tmp_path / "c")
    assert "data_batch_3" in str(e.value)
    assert not marker.exists()
    with pytest.raises(DataError, match="builtins.eval"):
        sources.RestrictedUnpickler(io.BytesIO(pickle.dumps(eval)), encoding="bytes").load()


# ----------------------------------------------------------------------------------------------
# Download (local file:// archives only, never the network)
# ----------------------------------------------------------------------------------------------


def _tar_gz(path: Path, members: dict[str, bytes], symlink: tuple[str, str] | None = None):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink[0])
            info.type = tarfile.SYMTYPE
            info.linkname = symlink[1]
            tar.addfile(info)


def _use_archive(monkeypatch, archive: Path, md5: str | None = None):
    md5 = md5 or hashlib.md5(archive.read_bytes()).hexdigest()
    arch = sources.Archive(url=archive.as_uri(), md5=md5, folder="cifar-10-batches-py")
    monkeypatch.setitem(sources.ARCHIVES, "cifar10", arch)


def test_download_extracts_and_loads(tmp_path, monkeypatch):
    src = tmp_path / "src"
    trx, *_ = write_cifar10_python(src)
    members = {
        f"cifar-10-batches-py/{p.name}": p.read_bytes()
        for p in (src / "cifar-10-batches-py").iterdir()
    }
    archive = tmp_path / "cifar-10-python.tar.gz"
    _tar_gz(archive, members)
    _use_archive(monkeypatch, archive)
    root = tmp_path / "root"
    a = load_cifar(root, download=True, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(a.train.images, trx)
    assert (root / "cifar-10-python.tar.gz").is_file()
    # second call finds the extracted files and does not download again
    monkeypatch.setattr(sources.urllib.request, "urlopen", _fail)
    load_cifar(root, download=True, cache_dir=tmp_path / "c")


def test_download_md5_mismatch(tmp_path, monkeypatch):
    archive = tmp_path / "a.tar.gz"
    _tar_gz(archive, {"cifar-10-batches-py/x": b"1"})
    _use_archive(monkeypatch, archive, md5="0" * 32)
    root = tmp_path / "root"
    with pytest.raises(DataError, match=f"MD5 mismatch.*expected {'0' * 32}"):
        load_cifar(root, download=True)
    assert list(root.iterdir()) == []  # bad download deleted, nothing extracted


@pytest.mark.parametrize(
    "members,symlink",
    [
        ({"../evil.txt": b"x"}, None),
        ({"cifar-10-batches-py/../../evil.txt": b"x"}, None),
        ({"/tmp/metamorph-evil.txt": b"x"}, None),
        ({"cifar-10-batches-py/ok": b"x"}, ("cifar-10-batches-py/link", "/etc/passwd")),
    ],
)
def test_download_rejects_unsafe_archive(tmp_path, monkeypatch, members, symlink):
    archive = tmp_path / "a.tar.gz"
    _tar_gz(archive, members, symlink)
    _use_archive(monkeypatch, archive)
    root = tmp_path / "deep" / "root"
    with pytest.raises(DataError, match="refusing to extract"):
        load_cifar(root, download=True)
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/metamorph-evil.txt").exists()
    assert not (root / "cifar-10-batches-py").exists()


# ----------------------------------------------------------------------------------------------
# Embedded data set
# ----------------------------------------------------------------------------------------------


def test_embedded_cifar10_mini():
    a = load_embedded("cifar10-mini")
    assert a.train.images.shape == (5000, 32, 32, 3) and a.test.images.shape == (1000, 32, 32, 3)
    assert a.train.images.dtype == np.uint8 and a.train.labels.dtype == np.int64
    assert a.classes == C10
    assert np.bincount(a.train.labels).tolist() == [500] * 10
    assert np.bincount(a.test.labels).tolist() == [100] * 10
    assert a.train.images.std() > 30  # real pictures, not blank
    b = load_cifar("embedded:cifar10-mini")
    np.testing.assert_array_equal(a.test.images, b.test.images)
    b.train.images[:] = 0  # callers get copies: the in-memory cache is unaffected
    assert load_embedded().train.images.any()
    with pytest.raises(DataError, match="expected 100 classes for cifar100, found 10"):
        load_cifar("embedded:cifar10-mini", name="cifar100")
    with pytest.raises(DataError, match="unknown embedded data set 'nope'.*cifar10-mini"):
        load_cifar("embedded:nope")


def _png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def test_embedded_format_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = _rand_images(rng, 5)

    splits = {
        "train": ([_png(x) for x in imgs[:3]], [0, 1, 1]),
        "test": ([_png(x) for x in imgs[3:]], [1, 0]),
    }
    p1, p2 = tmp_path / "a.bin", tmp_path / "b.bin"
    embedded_mod.write_embedded(p1, "t", ["x", "y"], splits)
    embedded_mod.write_embedded(p2, "t", ["x", "y"], splits)
    assert p1.read_bytes() == p2.read_bytes()  # reproducible
    a = embedded_mod._read(p1)
    np.testing.assert_array_equal(a.train.images, imgs[:3])
    np.testing.assert_array_equal(a.test.images, imgs[3:])
    assert a.train.labels.tolist() == [0, 1, 1] and a.classes == ["x", "y"]
    data = bytearray(p1.read_bytes())
    data[-5] ^= 0xFF
    p1.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch"):
        embedded_mod._read(p1)


def test_data_pack_as_root(tmp_path):
    """A pack file passed as ``root`` loads like the image folders it was built from."""
    rng = np.random.default_rng(1)
    imgs = _rand_images(rng, 40)

    labels = [i % 10 for i in range(40)]
    splits = {
        "train": ([_png(x) for x in imgs[:30]], labels[:30]),
        "test": ([_png(x) for x in imgs[30:]], labels[30:]),
    }
    pack = tmp_path / "c10.bin"
    embedded_mod.write_embedded(pack, "c10", C10, splits)
    a = load_cifar(pack)
    np.testing.assert_array_equal(a.train.images, imgs[:30])
    np.testing.assert_array_equal(a.test.labels, labels[30:])
    assert a.classes == C10
    with pytest.raises(DataError, match="expected 100 classes for cifar100, found 10"):
        load_cifar(pack, name="cifar100")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match="is a file but not a metamorph data pack"):
        load_cifar(other)


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------


def _reference_crops(img: np.ndarray, p: int) -> dict:
    """All (dy, dx, flip) crops of one CHW image, computed plainly with numpy."""
    padded = np.pad(img, ((0, 0), (p, p), (p, p)))
    h, w = img.shape[1:]
    out = {}
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out[(dy, dx, False)] = crop
            out[(dy, dx, True)] = crop[:, :, ::-1]
    return out


def test_random_crop_flip_matches_reference():
    n, p = 400, 2
    base = (np.arange(2 * 6 * 5).reshape(2, 6, 5) + 1).astype(np.uint8)  # distinct, nonzero
    x = torch.from_numpy(np.repeat(base[None], n, 0))
    out = random_crop_flip(x, padding=p, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    refs = _reference_crops(base, p)
    seen = []
    for img in out.numpy():
        matches = [k for k, r in refs.items() if np.array_equal(r, img)]
        assert len(matches) == 1, "output is not a zero-padded shifted (and maybe flipped) copy"
        seen.append(matches[0])
    flips = sum(k[2] for k in seen)
    assert 0.4 * n < flips < 0.6 * n
    assert {(k[0], k[1]) for k in seen} == {(dy, dx) for dy in range(5) for dx in range(5)}


def test_random_crop_flip_properties():
    x = torch.rand(8, 3, 32, 32)
    out = random_crop_flip(x, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    same = random_crop_flip(x, generator=torch.Generator().manual_seed(1))
    other = random_crop_flip(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, same) and not torch.equal(out, other)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    # a flip-only transform of a single image: either identity or mirrored
    y = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(3))
    for a, b in zip(x, y):
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)


def test_normalize_values():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    y = normalize(x, mean, std)
    assert y.dtype == torch.float32 and y.shape == (1, 3, 1, 3)
    for c in range(3):
        expected = (torch.tensor([0.0, 0.2, 1.0]) - mean[c]) / std[c]
        torch.testing.assert_close(y[0, c, 0], expected)
    # floats are taken as already scaled to [0, 1]
    torch.testing.assert_close(normalize(x.float() / 255, mean, std), y)


# ----------------------------------------------------------------------------------------------
# Data module
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def c10_root(tmp_path):
    write_cifar10_python(tmp_path / "d", per_batch=40, n_test=50)  # 200 train (20/class), 50 test
    return tmp_path / "d"


def _dm(root, tmp_path, **kw):
    kw.setdefault("cache_dir", tmp_path / "cache")
    dm = CIFARDataModule(str(root), **kw)
    dm.setup()
    return dm


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in x.reshape(len(x), -1).numpy()}


def test_datamodule_splits(c10_root, tmp_path):
    dm = _dm(c10_root, tmp_path, val_size=50, batch_size=32)
    (trx, try_), (vx, vy), (tex, tey) = (dm.split_tensors(s) for s in ("train", "val", "test"))
    assert (len(try_), len(vy), len(tey)) == (150, 50, 50)
    assert trx.dtype == torch.uint8 and trx.shape[1:] == (3, 32, 32) and try_.dtype == torch.int64
    assert _rows(trx).isdisjoint(_rows(vx))
    all_train = load_cifar(c10_root, cache_dir=tmp_path / "cache").train.images
    assert _rows(trx) | _rows(vx) == _rows(torch.from_numpy(all_train).permute(0, 3, 1, 2))
    assert torch.bincount(vy, minlength=10).tolist() == [5] * 10  # stratified
    assert dm.num_classes == 10 and dm.classes == C10

    batches = list(dm.train_dataloader())
    assert len(batches) == 150 // 32 and all(len(b[1]) == 32 for b in batches)  # drop_last
    assert batches[0][0].dtype == torch.uint8
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 50
    assert sum(len(b[1]) for b in dm.test_dataloader()) == 50


def test_datamodule_seeded(c10_root, tmp_path):
    a = _dm(c10_root, tmp_path, val_size=30, seed=3)
    b = _dm(c10_root, tmp_path, val_size=30, seed=3)
    c = _dm(c10_root, tmp_path, val_size=30, seed=4)
    assert torch.equal(a.split_tensors("val")[0], b.split_tensors("val")[0])
    assert not torch.equal(a.split_tensors("val")[0], c.split_tensors("val")[0])
    first = [next(iter(dm.train_dataloader()))[1] for dm in (a, b, c)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


def test_datamodule_val_zero_and_subsets(c10_root, tmp_path):
    dm = _dm(c10_root, tmp_path, val_size=0)
    assert dm.val_dataloader() == [] and len(dm.split_tensors("train")[1]) == 200
    dm = _dm(c10_root, tmp_path, val_size=20, train_subset=60, test_subset=25)
    tr, te = dm.split_tensors("train")[1], dm.split_tensors("test")[1]
    assert len(tr) == 60 and len(te) == 25
    assert torch.bincount(tr, minlength=10).tolist() == [6] * 10
    assert len(dm.split_tensors("val")[1]) == 20
    with pytest.raises(DataError, match="val_size=200 must be in"):
        _dm(c10_root, tmp_path, val_size=200)


def test_datamodule_small_train_set_keeps_partial_batch(c10_root, tmp_path):
    dm = _dm(c10_root, tmp_path, val_size=0, train_subset=10, batch_size=32)
    assert [len(b[1]) for b in dm.train_dataloader()] == [10]


def test_datamodule_after_batch_transfer(c10_root, tmp_path):
    dm = _dm(c10_root, tmp_path, val_size=50)
    x, y = next(iter(dm.test_dataloader()))
    dm.trainer = SimpleNamespace(training=False)
    ex, ey = dm.on_after_batch_transfer((x, y), 0)
    torch.testing.assert_close(ex, normalize(x, dm.mean, dm.std))
    assert ey is y and ex.dtype == torch.float32
    dm.trainer = SimpleNamespace(training=True)
    tx, _ = dm.on_after_batch_transfer((x, y), 0)
    assert tx.shape == x.shape and tx.dtype == torch.float32 and not torch.equal(tx, ex)
    dm.augment = False
    torch.testing.assert_close(dm.on_after_batch_transfer((x, y), 0)[0], ex)

    dm.set_normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    dm.trainer = SimpleNamespace(training=False)
    got = dm.on_after_batch_transfer((x, y), 0)[0]
    m = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    s = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(got, (x.float() / 255 - m) / s)


def test_datamodule_eval_helpers(c10_root, tmp_path):
    dm = _dm(c10_root, tmp_path, val_size=50)
    sx, sy = dm.subset("val", 12, seed=7)
    assert len(sy) == 12 and _rows(sx) <= _rows(dm.split_tensors("val")[0])
    assert torch.equal(dm.subset("val", 12, seed=7)[0], sx)
    assert not torch.equal(dm.subset("val", 12, seed=8)[0], sx)
    sizes = [len(b[1]) for b in dm.normalized_batches("test", batch_size=16)]
    assert sizes == [16, 16, 16, 2]
    (bx, by), *_ = dm.iterate_split((sx, sy), batch_size=100)
    assert bx.dtype == torch.float32 and torch.equal(by, sy)
    torch.testing.assert_close(bx, normalize(sx, dm.mean, dm.std))


def test_datamodule_lazy_properties(c10_root, tmp_path):
    dm = CIFARDataModule(str(c10_root), cache_dir=tmp_path / "cache", val_size=10)
    assert dm.num_classes == 10  # loads on demand


def test_datamodule_in_trainer(tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3 * 32 * 32, 10)
            self.seen = []

        def training_step(self, batch, idx):
            x, y = batch
            self.seen.append(("train", x.dtype, tuple(x.shape)))
            return torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y)

        def validation_step(self, batch, idx):
            self.seen.append(("val", batch[0].dtype, tuple(batch[0].shape)))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = CIFARDataModule(
        "embedded:cifar10-mini", val_size=100, batch_size=64, train_subset=128, eval_batch_size=50
    )
    model = Probe()
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert ("train", torch.float32, (64, 3, 32, 32)) in model.seen
    assert ("val", torch.float32, (50, 3, 32, 32)) in model.seen
    assert sum(1 for s in model.seen if s[0] == "train") == 2


def test_stratified_indices():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_indices(labels, 10, np.random.default_rng(0))
    assert len(idx) == 10 and len(set(idx.tolist())) == 10 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [5, 3, 2]
    idx = stratified_indices(labels, 7, np.random.default_rng(0))  # 3.5, 2.1, 1.4 -> 4, 2, 1
    assert np.bincount(labels[idx], minlength=3).tolist() == [4, 2, 1]
    assert len(stratified_indices(labels, 0, np.random.default_rng(0))) == 0
