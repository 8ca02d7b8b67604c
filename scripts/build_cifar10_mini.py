#!/usr/bin/env python
"""Rebuild the embedded ``cifar10-mini`` data set from the CIFAR-10 JPEG image folders.

Takes the first 500 train / 100 test files of every class (sorted file names) and stores their
raw JPEG bytes, labels and class names in one file (format: ``metamorph/data/embedded.py``).
The output is byte-identical across runs.

    python scripts/build_cifar10_mini.py --src ../shared/data/cifar10-jpeg \
        --out metamorph/data/embedded/cifar10-mini.bin
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from metamorph.data.embedded import load_embedded, write_embedded  # noqa: E402
from metamorph.data.sources import _decode_image  # noqa: E402

PER_CLASS = {"train": 500, "test": 100}


def collect(src: Path, split: str, classes: list[str], n: int) -> tuple[list[bytes], list[int]]:
    blobs, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (src / split / cls).iterdir() if p.is_file())
        if len(files) < n:
            sys.exit(f"{src / split / cls} has {len(files)} files, need {n}")
        for p in files[:n]:
            _decode_image(p)  # fail early on unreadable / non-32x32 files
            blobs.append(p.read_bytes())
            labels.append(label)
    return blobs, labels


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--src", type=Path, required=True, help="cifar10-jpeg folder (train/, test/)")
    ap.add_argument("--out", type=Path, required=True, help="output .bin file")
    args = ap.parse_args()

    classes = sorted(p.name for p in (args.src / "train").iterdir() if p.is_dir())
    if len(classes) != 10:
        sys.exit(f"expected 10 class folders in {args.src / 'train'}, found {len(classes)}")
    splits = {s: collect(args.src, s, classes, n) for s, n in PER_CLASS.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = write_embedded(args.out, "cifar10-mini", classes, splits)
    print(f"wrote {args.out}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")

    if args.out.resolve().parent == (REPO / "metamorph/data/embedded").resolve():
        arrays = load_embedded(args.out.stem)
        print(
            f"check: {len(arrays.train)} train, {len(arrays.test)} test, classes {arrays.classes}"
        )


if __name__ == "__main__":
    main()
