"""Small data sets shipped inside the package (``metamorph/data/embedded/<name>.bin``).

``cifar10-mini`` is a fixed class-balanced subset of CIFAR-10 (from the JPEG image-folder
copy): 500 train + 100 test images per class, stored as the original JPEG bytes.

File format (little-endian, no pickle)::

    8 bytes   magic b"MMEMBED1"
    4 bytes   uint32 length H of the header
    H bytes   UTF-8 JSON header (sorted keys):
              {"format": 1, "name": str, "classes": [str], "payload_sha256": hex,
               "split_order": ["train", "test"],
               "splits": {"train": {"labels": [int], "sizes": [int]}, "test": {...}}}
    rest      payload: the encoded images of each split (in ``split_order``) concatenated;
              image i of a split spans ``sizes[i]`` bytes after the previous one.

Rebuild ``cifar10-mini`` with ``scripts/build_cifar10_mini.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import numpy as np

from .sources import IMAGE_SIZE, ArraySplit, CifarArrays, DataError

__all__ = [
    "EMBEDDED_DIR",
    "available_embedded",
    "embedded_path",
    "is_pack_file",
    "load_embedded",
    "load_pack",
    "write_embedded",
]

EMBEDDED_DIR = Path(__file__).with_name("embedded")
MAGIC = b"MMEMBED1"
FORMAT_VERSION = 1
SPLITS = ("train", "test")

_memory_cache: dict[str, CifarArrays] = {}


def available_embedded() -> list[str]:
    """Names of the embedded data sets shipped with the package."""
    return sorted(p.stem for p in EMBEDDED_DIR.glob("*.bin"))


def embedded_path(name: str) -> Path:
    """Path of the embedded data set ``name``; ``DataError`` if there is none."""
    path = EMBEDDED_DIR / f"{name}.bin"
    if not path.is_file():
        raise DataError(
            f"unknown embedded data set '{name}'; available: {available_embedded()} "
            f"(use data.root=embedded:<name>)"
        )
    return path


def write_embedded(
    path: str | Path,
    name: str,
    classes: list[str],
    splits: dict[str, tuple[list[bytes], list[int]]],
) -> bytes:
    """Write an embedded data set; ``splits[s] = (encoded images, labels)``.

    The output depends only on the arguments (byte-identical across runs). Returns the bytes.
    """
    header: dict = {
        "format": FORMAT_VERSION,
        "name": name,
        "classes": list(classes),
        "split_order": list(SPLITS),
        "splits": {},
    }
    payload = bytearray()
    for s in SPLITS:
        blobs, labels = splits[s]
        if len(blobs) != len(labels):
            raise ValueError(f"split {s}: {len(blobs)} images but {len(labels)} labels")
        header["splits"][s] = {"labels": [int(x) for x in labels], "sizes": [len(b) for b in blobs]}
        for b in blobs:
            payload += b
    header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    data = MAGIC + struct.pack("<I", len(head)) + head + bytes(payload)
    Path(path).write_bytes(data)
    return data


def _parse(data: bytes, source: str) -> tuple[dict, memoryview]:
    if data[:8] != MAGIC or len(data) < 12:
        raise DataError(f"{source} is not a metamorph embedded data file (bad magic)")
    (hlen,) = struct.unpack("<I", data[8:12])
    try:
        header = json.loads(data[12 : 12 + hlen].decode("utf-8"))
    except ValueError as e:
        raise DataError(f"{source}: corrupt header ({e}); reinstall the package") from e
    if header.get("format") != FORMAT_VERSION:
        raise DataError(f"{source}: unsupported embedded format {header.get('format')}")
    payload = memoryview(data)[12 + hlen :]
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise DataError(
            f"{source}: payload checksum mismatch (file corrupt); reinstall the package"
        )
    return header, payload


def _decode(blob: memoryview, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.load()
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise DataError(f"{where} is {im.size[0]}x{im.size[1]}, expected 32x32")
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot decode {where}: {type(e).__name__}: {e}") from e


def _read(path: Path) -> CifarArrays:
    header, payload = _parse(path.read_bytes(), str(path))
    offset = 0
    out = {}
    for s in header["split_order"]:
        info = header["splits"][s]
        sizes, labels = info["sizes"], info["labels"]
        images = np.empty((len(sizes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        for i, size in enumerate(sizes):
            images[i] = _decode(payload[offset : offset + size], f"{path}:{s}[{i}]")
            offset += size
        out[s] = ArraySplit(images, np.asarray(labels, dtype=np.int64))
    if offset != len(payload):
        raise DataError(f"{path}: {len(payload) - offset} trailing payload bytes (file corrupt)")
    return CifarArrays(train=out["train"], test=out["test"], classes=list(header["classes"]))


def is_pack_file(path: str | Path) -> bool:
    """Whether ``path`` is a file in this format (checks the magic bytes only)."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def load_pack(path: str | Path) -> CifarArrays:
    """Decode a data pack in this format from any path (``data.root=/path/to/file.bin``).

    Packs carry a whole data set as its encoded images in one file (for example all of
    CIFAR-10 as JPEG bytes, ~55 MB): handy for copying data to a cluster node or GPU box.
    Build one with ``scripts/build_cifar10_mini.py --per-class-train 0 --per-class-test 0``.
    """
    return _read(Path(path))


def load_embedded(name: str = "cifar10-mini") -> CifarArrays:
    """Decode an embedded data set (cached in memory; each call returns fresh copies)."""
    if name not in _memory_cache:
        _memory_cache[name] = _read(embedded_path(name))
    a = _memory_cache[name]
    return CifarArrays(
        train=ArraySplit(a.train.images.copy(), a.train.labels.copy()),
        test=ArraySplit(a.test.images.copy(), a.test.labels.copy()),
        classes=list(a.classes),
    )
