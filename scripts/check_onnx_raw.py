"""Score an exported ONNX model on raw images, as a deployer would feed it.

Images are decoded with Pillow from an image folder (``<root>/<split>/<class>/*``), scaled to
[0, 1] and fed as float32 NCHW to onnxruntime, with nothing else done to them: the model's own
metadata (``metamorph_input``) says whether that is what it expects. The label of a class folder
is its index in the metadata's ``class_names``. With ``--model <name>.json`` the same pixels also
go through the PyTorch model file (normalised with its recorded mean/std, as ``metamorph-eval``
does) and the script reports how often the two agree.

    metamorph-sample ckpt=outputs/quickstart/metamorph/metamorph.ckpt gamma=0.5 \\
        out=outputs/deploy/r20_g05 format=onnx
    python scripts/check_onnx_raw.py outputs/deploy/r20_g05.onnx \\
        --root ../shared/data/cifar10-jpeg --model outputs/deploy/r20_g05.json
    metamorph-eval src=outputs/deploy/r20_g05.json data=cifar10 data.root=../shared/data/cifar10-jpeg

Prints one readable line per figure, then a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def read_split(root: Path, split: str, classes: list[str], limit: int | None):
    """(uint8 NHWC images, labels) of ``root/split/<class>/*`` in sorted file order."""
    from PIL import Image

    folder = root / split
    if not folder.is_dir():
        raise SystemExit(f"check_onnx_raw: error: {folder} is not a folder of class folders")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise SystemExit(
            f"check_onnx_raw: error: class folders {unknown} are not among the model's classes "
            f"{classes}"
        )
    images, labels = [], []
    for name in found:
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for p in files:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            labels.append(classes.index(name))
    if limit is not None:
        idx = np.random.default_rng(0).permutation(len(labels))[:limit]
        images, labels = [images[i] for i in idx], [labels[i] for i in idx]
    return np.stack(images), np.asarray(labels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx", type=Path, help="the exported <name>.onnx")
    ap.add_argument("--root", type=Path, required=True, help="image folder with <split>/<class>/")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="a seeded subset of this many images")
    ap.add_argument("--model", type=Path, default=None, help="the PyTorch model file to compare")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort

    t0 = time.time()
    meta = {
        p.key: p.value for p in onnx.load(str(args.onnx), load_external_data=False).metadata_props
    }
    spec = json.loads(meta.get("metamorph_input", "{}"))
    classes = spec.get("class_names")
    if not classes:
        raise SystemExit(
            f"check_onnx_raw: error: {args.onnx} has no metamorph_input metadata with class "
            "names; re-export it with metamorph-sample format=onnx"
        )
    x8, y = read_split(args.root, args.split, classes, args.limit)
    raw = (x8.astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()  # NCHW, [0, 1]
    opts = ort.SessionOptions()
    if args.threads:
        opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(args.onnx), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate(
        [
            sess.run(None, {name: raw[i : i + args.batch]})[0].argmax(1)
            for i in range(0, len(raw), args.batch)
        ]
    )
    acc = 100.0 * float((pred == y).mean())
    summary = {
        "onnx": str(args.onnx),
        "images": int(len(y)),
        "split": args.split,
        "input": spec.get("range"),
        "normalize_in_graph": spec.get("normalize_in_graph"),
        "onnx_raw_acc": round(acc, 3),
    }
    print(f"[check_onnx_raw] {args.onnx} on {len(y):,} raw {args.split} images of {args.root}")
    print(
        f"  input the graph expects: {spec.get('range')} ({spec.get('layout')}, {spec.get('dtype')})"
    )
    print(f"  onnxruntime on raw [0, 1] pixels: {acc:.2f}%")
    if args.model is not None:
        import torch

        import metamorph
        from metamorph.data.transforms import normalize

        model = metamorph.load(args.model).eval()
        with torch.no_grad():
            ref = torch.cat(
                [
                    model(
                        normalize(
                            torch.from_numpy(raw[i : i + args.batch]),
                            model.arch.mean,
                            model.arch.std,
                        )
                    ).argmax(1)
                    for i in range(0, len(raw), args.batch)
                ]
            ).numpy()
        summary["pytorch_acc"] = round(100.0 * float((ref == y).mean()), 3)
        summary["agreement"] = round(100.0 * float((ref == pred).mean()), 3)
        print(
            f"  PyTorch model file, normalised as metamorph-eval does: {summary['pytorch_acc']:.2f}%; "
            f"same prediction on {summary['agreement']:.2f}% of the images"
        )
    summary["time_s"] = round(time.time() - t0, 1)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
