"""Readers for CIFAR-10 / CIFAR-100 as uint8 numpy arrays.

``load_cifar`` accepts three kinds of ``root`` (auto-detected):

* the official CIFAR *python* layout (``cifar-10-batches-py/`` or ``cifar-100-python/``, or a
  path pointing straight at that folder), read with a restricted unpickler;
* an *image-folder* layout ``root/{train,test}/<class>/<image>`` (any format Pillow reads,
  32x32 pixels); classes sorted alphabetically give the label ids;
* ``embedded:<name>``, a small data set shipped inside the package (see ``embedded.py``).

With ``download=True`` the official archive is fetched, MD5-checked and safely extracted first.
Decoded arrays are cached as an ``.npz`` (no pickle) keyed by a fingerprint of the source files,
so a second load is fast and an edited source invalidates the cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import urllib.request
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

__all__ = [
    "ARCHIVES",
    "CACHE_ENV_VAR",
    "DATASET_NUM_CLASSES",
    "EMBEDDED_PREFIX",
    "Archive",
    "ArraySplit",
    "CifarArrays",
    "DataError",
    "RestrictedUnpickler",
    "default_cache_dir",
    "download_cifar",
    "load_cifar",
    "safe_extract",
]

IMAGE_SIZE = 32
DATASET_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
CIFAR10_CLASSES = (  # label order of the official batches and of the sorted image folders
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
EMBEDDED_PREFIX = "embedded:"
CACHE_ENV_VAR = "METAMORPH_CACHE"
_CACHE_VERSION = 1  # bump when the cached array layout changes


class DataError(ValueError):
    """A data set could not be found, read or validated; the message says how to fix it."""


@dataclass
class ArraySplit:
    """One split: ``images`` uint8 ``(N, 32, 32, 3)`` (HWC, RGB) and ``labels`` int64 ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class CifarArrays:
    """Train and test splits plus the class names (index = label id)."""

    train: ArraySplit
    test: ArraySplit
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Archive:
    """Where the official archive of a data set lives and what its MD5 must be."""

    url: str
    md5: str
    folder: str  # top-level folder inside the archive


ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
    ),
    "cifar100": Archive(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
    ),
}

_PY_FILES = {
    "cifar10": {
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
    },
    "cifar100": {
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
    },
}


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


def _allowed_globals() -> dict[tuple[str, str], object]:
    import codecs

    core = getattr(np, "_core", None)
    if core is None:  # numpy < 2
        core = np.core  # pragma: no cover
    reconstruct = core.multiarray._reconstruct
    frombuffer = core.numeric._frombuffer
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles with protocol <= 2 store bytes via _codecs.encode(str, "latin1").
        ("_codecs", "encode"): codecs.encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{mod}.numeric", "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed to rebuild numpy arrays.

    The CIFAR python files are pickles; loading them with plain ``pickle`` would run any
    callable a tampered file names. Anything outside the allow-list raises ``DataError``.
    """

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):  # noqa: D102
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle global '{module}.{name}': CIFAR pickle files only "
                "contain numpy arrays, lists and dicts. The file is not a genuine CIFAR "
                "batch file (possibly tampered with); delete it and download the data again."
            ) from None


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # truncated / not a pickle
        raise DataError(
            f"cannot read CIFAR batch file {path}: {type(e).__name__}: {e}. "
            "The file is corrupt; delete it and download the data again."
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch file (expected a dict, got {type(obj)})")
    # Original files were written by Python 2: keys (and names) come back as bytes.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _decode_name(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


# --------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------


def _python_dir(root: Path, name: str) -> Path | None:
    """The folder holding the CIFAR python files for ``name``, if ``root`` has one."""
    spec = _PY_FILES[name]
    needed = [*spec["train"], *spec["test"], spec["meta"]]
    for cand in (root / ARCHIVES[name].folder, root):
        if all((cand / f).is_file() for f in needed):
            return cand
    return None


def _is_image_folder(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _layout_hint(root: Path, name: str) -> str:
    other = "cifar100" if name == "cifar10" else "cifar10"
    if _python_dir(root, other) is not None:
        return f" (found the {other} python layout: did you mean data.name={other}?)"
    return ""


# --------------------------------------------------------------------------------------------
# Source fingerprint + on-disk cache
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$METAMORPH_CACHE/data`` if the variable is set, else ``~/.cache/metamorph/data``."""
    base = os.environ.get(CACHE_ENV_VAR)
    if base:
        return Path(base).expanduser() / "data"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "metamorph" / "data"


def _stat_record(path: Path, root: Path) -> tuple[str, int, int]:
    st = path.stat()
    return path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns


def _fingerprint(records: list[tuple[str, int, int]], tag: str) -> str:
    """Hash of (relative path, size, mtime_ns) of every source file, plus a tag."""
    h = hashlib.sha256(f"metamorph-data-cache-v{_CACHE_VERSION}|{tag}\n".encode())
    for rel, size, mtime_ns in records:
        h.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
    return h.hexdigest()


def _read_cache(path: Path) -> CifarArrays | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = CifarArrays(
                train=ArraySplit(z["train_images"], z["train_labels"]),
                test=ArraySplit(z["test_images"], z["test_labels"]),
                classes=[str(c) for c in z["classes"]],
            )
        _validate(arrays, source=str(path))
        return arrays
    except Exception as e:  # unreadable or inconsistent cache: rebuild it
        warnings.warn(f"ignoring unreadable data cache {path} ({e}); rebuilding it", stacklevel=3)
        return None


def _write_cache(path: Path, arrays: CifarArrays) -> None:
    """Write atomically (temp file + ``os.replace``); a failure only warns."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            np.savez(
                f,
                train_images=arrays.train.images,
                train_labels=arrays.train.labels,
                test_images=arrays.test.images,
                test_labels=arrays.test.labels,
                classes=np.array(arrays.classes, dtype=np.str_),
            )
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write data cache {path}: {e}", stacklevel=3)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _python_sources(pdir: Path, name: str) -> list[Path]:
    spec = _PY_FILES[name]
    return [pdir / f for f in (*spec["train"], *spec["test"], spec["meta"])]


def _read_python(pdir: Path, name: str) -> CifarArrays:
    spec = _PY_FILES[name]

    def read_split(files: list[str]) -> ArraySplit:
        images, labels = [], []
        for fname in files:
            d = _load_pickle(pdir / fname)
            if "data" not in d or spec["labels"] not in d:
                raise DataError(
                    f"{pdir / fname} lacks 'data' or '{spec['labels']}': not a {name} batch file"
                )
            data = np.asarray(d["data"], dtype=np.uint8)
            lab = np.asarray(d[spec["labels"]], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
                raise DataError(
                    f"{pdir / fname}: expected data of shape (N, 3072), got {data.shape}"
                )
            if len(lab) != len(data):
                raise DataError(f"{pdir / fname}: {len(data)} images but {len(lab)} labels")
            # Stored as N x (R plane, G plane, B plane) -> N x H x W x C.
            images.append(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
            labels.append(lab)
        return ArraySplit(
            np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels).astype(np.int64)
        )

    meta = _load_pickle(pdir / spec["meta"])
    if spec["names"] not in meta:
        raise DataError(f"{pdir / spec['meta']} lacks '{spec['names']}': not a {name} meta file")
    classes = [_decode_name(c) for c in meta[spec["names"]]]
    return CifarArrays(read_split(spec["train"]), read_split(spec["test"]), classes)


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _list_image_folder(root: Path) -> tuple[list[str], dict, list[tuple[str, int, int]]]:
    """Classes, per split the sorted (file, label) pairs, and stat records of all files."""
    exts = _image_extensions()
    class_lists = {}
    for split in ("train", "test"):
        class_lists[split] = sorted(
            e.name for e in os.scandir(root / split) if e.is_dir() and not e.name.startswith(".")
        )
    if class_lists["train"] != class_lists["test"]:
        only_train = sorted(set(class_lists["train"]) - set(class_lists["test"]))
        only_test = sorted(set(class_lists["test"]) - set(class_lists["train"]))
        raise DataError(
            f"class folders of {root / 'train'} and {root / 'test'} differ: "
            f"only in train: {only_train}, only in test: {only_test}. "
            "Both splits need the same class sub-folders."
        )
    classes = class_lists["train"]
    items: dict[str, list[tuple[Path, int]]] = {}
    records = []
    for split in ("train", "test"):
        items[split] = []
        for label, cls in enumerate(classes):
            cdir = root / split / cls
            entries = sorted(
                (
                    e
                    for e in os.scandir(cdir)
                    if e.is_file()
                    and not e.name.startswith(".")
                    and os.path.splitext(e.name)[1].lower() in exts
                ),
                key=lambda e: e.name,
            )
            if not entries:
                raise DataError(f"class folder {cdir} contains no image files")
            for e in entries:
                st = e.stat()
                records.append((f"{split}/{cls}/{e.name}", st.st_size, st.st_mtime_ns))
                items[split].append((cdir / e.name, label))
    return classes, items, records


def _decode_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            size = im.size
            if size == (IMAGE_SIZE, IMAGE_SIZE):
                arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise DataError(
            f"cannot read image {path}: {type(e).__name__}: {e}. "
            "The file is corrupt or not an image; delete or replace it."
        ) from e
    if size != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"image {path} is {size[0]}x{size[1]} pixels; CIFAR images must be "
            f"{IMAGE_SIZE}x{IMAGE_SIZE}. Resize the data set or remove the file."
        )
    return arr


def _decode_files(paths: list[Path], workers: int | None = None) -> np.ndarray:
    """Decode images into one ``(N, 32, 32, 3)`` uint8 array (thread pool over chunks)."""
    out = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            out[i] = _decode_image(paths[i])

    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    chunk = 1024
    bounds = [(s, min(s + chunk, len(paths))) for s in range(0, len(paths), chunk)]
    if workers <= 1 or len(bounds) <= 1:
        for s, e in bounds:
            work(s, e)
    else:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            for fut in [ex.submit(work, s, e) for s, e in bounds]:
                fut.result()
    return out


def _read_image_folder(root: Path, classes: list[str], items: dict) -> CifarArrays:
    splits = {}
    for split in ("train", "test"):
        paths = [p for p, _ in items[split]]
        labels = np.array([lab for _, lab in items[split]], dtype=np.int64)
        splits[split] = ArraySplit(_decode_files(paths), labels)
    return CifarArrays(splits["train"], splits["test"], list(classes))


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into ``dest``, rejecting absolute paths, ``..`` and links/devices."""
    dest = Path(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            parts = PurePosixPath(m.name).parts
            if (
                m.name.startswith(("/", "\\"))
                or PurePosixPath(m.name).is_absolute()
                or ".." in parts
            ):
                raise DataError(
                    f"unsafe path '{m.name}' in archive {archive}; refusing to extract it"
                )
            if not (m.isfile() or m.isdir()):
                raise DataError(
                    f"archive {archive} contains a link or special file '{m.name}'; "
                    "refusing to extract it"
                )
        dest.mkdir(parents=True, exist_ok=True)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(dest, members=members)


def download_cifar(root: str | Path, name: str = "cifar10") -> Path:
    """Fetch, MD5-check and extract the official ``name`` archive into ``root``.

    Returns the folder holding the python files. Does nothing if they are already present.
    """
    _check_name(name)
    root = Path(root).expanduser()
    existing = _python_dir(root, name)
    if existing is not None:
        return existing
    arch = ARCHIVES[name]
    root.mkdir(parents=True, exist_ok=True)
    target = root / os.path.basename(arch.url)
    if not (target.is_file() and _md5(target) == arch.md5):
        tmp = target.with_name(target.name + ".part")
        try:
            with urllib.request.urlopen(arch.url) as resp, open(tmp, "wb") as f:
                shutil.copyfileobj(resp, f, length=1 << 20)
        except OSError as e:
            if tmp.exists():
                tmp.unlink()
            raise DataError(
                f"could not download {arch.url}: {e}. Check the network connection, or "
                f"download it by hand into {root} and set data.download=false"
            ) from e
        got = _md5(tmp)
        if got != arch.md5:
            tmp.unlink()
            raise DataError(
                f"MD5 mismatch for {arch.url}: expected {arch.md5}, got {got}. The download "
                "is corrupt or was tampered with (it has been deleted); try again."
            )
        os.replace(tmp, target)
    safe_extract(target, root)
    pdir = _python_dir(root, name)
    if pdir is None:
        raise DataError(f"archive {target} did not contain the expected {arch.folder}/ files")
    return pdir


# --------------------------------------------------------------------------------------------
# Validation + entry point
# --------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in DATASET_NUM_CLASSES:
        raise DataError(
            f"unknown data set name '{name}'; expected one of {sorted(DATASET_NUM_CLASSES)} "
            "(set data.name=...)"
        )


def _check_class_count(classes: list[str], name: str, source: str) -> None:
    expected = DATASET_NUM_CLASSES[name]
    if len(classes) != expected:
        raise DataError(
            f"{source}: expected {expected} classes for {name}, found {len(classes)}. "
            "Point data.root at a complete data set or set data.name to match it."
        )


def _validate(arrays: CifarArrays, source: str) -> None:
    n_cls = len(arrays.classes)
    for split_name, split in (("train", arrays.train), ("test", arrays.test)):
        im, lab = split.images, split.labels
        if im.dtype != np.uint8 or im.ndim != 4 or im.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise DataError(f"{source}: {split_name} images have shape {im.shape}/{im.dtype}")
        if lab.dtype != np.int64 or lab.shape != (im.shape[0],):
            raise DataError(f"{source}: {split_name} labels have shape {lab.shape}/{lab.dtype}")
        if len(lab) and (lab.min() < 0 or lab.max() >= n_cls):
            raise DataError(
                f"{source}: {split_name} labels span [{lab.min()}, {lab.max()}] "
                f"but there are {n_cls} classes"
            )


def load_cifar(
    root: str | Path,
    name: str = "cifar10",
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> CifarArrays:
    """Load CIFAR-10/100 from ``root`` as uint8 HWC arrays (see the module docstring).

    Args:
        root: data folder (python or image-folder layout), a data pack file (see
            :func:`metamorph.data.embedded.load_pack`) or ``"embedded:<name>"``.
        name: ``"cifar10"`` or ``"cifar100"``; fixes the expected class count.
        download: fetch the official archive into ``root`` if it is not there yet.
        cache_dir: where decoded arrays are cached; default :func:`default_cache_dir`.
    """
    _check_name(name)
    if str(root).startswith(EMBEDDED_PREFIX):
        from .embedded import load_embedded

        arrays = load_embedded(str(root)[len(EMBEDDED_PREFIX) :])
        _check_class_count(arrays.classes, name, str(root))
        return arrays

    root = Path(root).expanduser()
    if root.is_file():
        from .embedded import is_pack_file, load_pack

        if not is_pack_file(root):
            raise DataError(
                f"data root {root} is a file but not a metamorph data pack (bad magic); pass a "
                "folder (CIFAR python format or image folders) or a pack written by "
                "scripts/build_cifar10_mini.py"
            )
        arrays = load_pack(root)
        _check_class_count(arrays.classes, name, str(root))
        return arrays
    if download and not (_python_dir(root, name) or _is_image_folder(root)):
        download_cifar(root, name)
    if not root.exists():
        raise DataError(
            f"data root {root} does not exist; pass data.root=<folder with CIFAR data> "
            "or data.download=true"
        )

    pdir = _python_dir(root, name)
    if pdir is not None:
        layout = "python"
        records = [_stat_record(p, pdir) for p in _python_sources(pdir, name)]
    elif _is_image_folder(root):
        layout = "imagefolder"
        classes, items, records = _list_image_folder(root)
        _check_class_count(classes, name, str(root))
    else:
        folder = ARCHIVES[name].folder
        expected = " ".join(
            [*_PY_FILES[name]["train"], *_PY_FILES[name]["test"], _PY_FILES[name]["meta"]]
        )
        raise DataError(
            f"unrecognised data layout in {root}{_layout_hint(root, name)}. Expected one of: "
            f"(a) the CIFAR python files {root}/{folder}/{{{expected}}} (or root pointing at "
            f"that folder); (b) image folders {root}/train/<class>/* and {root}/test/<class>/*; "
            "or pass data.download=true to fetch the official archive"
        )

    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = _fingerprint(records, f"{name}|{layout}")
    cache_path = cache_root / f"{name}-{layout}-{digest[:24]}.npz"
    cached = _read_cache(cache_path)
    if cached is not None:
        _check_class_count(cached.classes, name, str(root))
        return cached

    if layout == "python":
        arrays = _read_python(pdir, name)
    else:
        arrays = _read_image_folder(root, classes, items)
    _check_class_count(arrays.classes, name, str(root))
    _validate(arrays, source=str(root))
    _write_cache(cache_path, arrays)
    return arrays
