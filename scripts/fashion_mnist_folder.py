#!/usr/bin/env python3
"""Write Fashion-MNIST (Debian's dataset-fashion-mnist package) as an ImageFolder of PNGs: docs/guide.md's "your own
data" example.

    apt-get install dataset-fashion-mnist           # 60k + 10k 28x28 images, MIT, in /usr/share/datasets/fashion-mnist
    python scripts/fashion_mnist_folder.py fmnist   # fmnist/train/<class>/*.png (100 a class), fmnist/test/... (50)

No val/ is written: peftx draws it from train/ (20 % of each class: 800 train / 200 val, like VTAB-1k). The first N
images of each class are taken, in file order, so the folder is the same on every machine.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format): big-endian magic with the dimension count, the sizes, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, out: Path, per_class: int) -> int:
    n = 0
    for c, name in enumerate(CLASSES):
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            Image.fromarray(images[i]).save(out / name / f"{i:05d}.png")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the ImageFolder root to write")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--source", type=Path, default=SOURCE)
    args = ap.parse_args(argv)
    if not (args.source / "train-images-idx3-ubyte.gz").is_file():
        print(
            f"fashion_mnist_folder.py: {args.source} has no Fashion-MNIST — apt-get install dataset-fashion-mnist",
            file=sys.stderr,
        )
        return 2
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("test", "t10k", args.test_per_class)):
        images = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")
        print(f"{split}: {write_split(images, labels, args.out / split, per_class)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
