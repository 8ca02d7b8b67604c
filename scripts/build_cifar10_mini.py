#!/usr/bin/env python
"""Rebuild the embedded ``cifar10-mini`` data set from the CIFAR-10 JPEG image folders.

Takes the first 500 train / 100 test files of every class (sorted file names) and stores their
raw JPEG bytes, labels and class names in one file (format: ``metamorph/data/embedded.py``).
The output is byte-identical across runs.

    python scripts/build_cifar10_mini.py --src ../shared/data/cifar10-jpeg \
        --out metamorph/data/embedded/cifar10-mini.bin

With ``--per-class-train 0 --per-class-test 0`` it packs every image instead (all of CIFAR-10
in ~55 MB, same image order as reading the folders), a file that ``data.root=`` accepts:

    python scripts/build_cifar10_mini.py --src ../shared/data/cifar10-jpeg \
        --out outputs/data/cifar10-full.bin --name cifar10-full --per-class-train 0 --per-class-test 0
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
        for p in files[:n] if n > 0 else files:
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
    ap.add_argument("--name", default="cifar10-mini", help="data set name in the header")
    ap.add_argument("--per-class-train", type=int, default=PER_CLASS["train"], help="0: all")
    ap.add_argument("--per-class-test", type=int, default=PER_CLASS["test"], help="0: all")
    args = ap.parse_args()

    classes = sorted(p.name for p in (args.src / "train").iterdir() if p.is_dir())
    if len(classes) != 10:
        sys.exit(f"expected 10 class folders in {args.src / 'train'}, found {len(classes)}")
    per_class = {"train": args.per_class_train, "test": args.per_class_test}
    splits = {s: collect(args.src, s, classes, n) for s, n in per_class.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = write_embedded(args.out, args.name, classes, splits)
    print(f"wrote {args.out}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")

    if args.out.resolve().parent == (REPO / "metamorph/data/embedded").resolve():
        arrays = load_embedded(args.out.stem)
        print(
            f"check: {len(arrays.train)} train, {len(arrays.test)} test, classes {arrays.classes}"
        )


if __name__ == "__main__":
    main()
