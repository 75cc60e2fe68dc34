"""docs/guide.md's "your own data" example: scripts/fashion_mnist_folder.py writes a real ImageFolder from Debian's
dataset-fashion-mnist, which peftx reads with a validation split drawn from train/ (skipped where the package is
not installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (SOURCE / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_folder_is_a_real_image_folder(tmp_path: Path) -> None:
    from peftx.data import load_splits

    out = tmp_path / "fmnist"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "fashion_mnist_folder.py"),
            str(out),
            "--train-per-class",
            "5",
            "--test-per-class",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["train:", "50", "images", "test:", "20", "images"]
    classes = sorted(p.name for p in (out / "train").iterdir())
    assert len(classes) == 10 and "ankle_boot" in classes and not (out / "val").exists()
    pixels = np.asarray(Image.open(next((out / "train" / "trouser").glob("*.png"))))
    assert pixels.shape == (28, 28) and pixels.std() > 10  # a real garment, not a blank
    cfg = {
        "input_size": (3, 28, 28),
        "interpolation": "bicubic",
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "crop_pct": 1.0,
    }
    splits = load_splits(out, cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 20)  # 1 of 5 per class drawn


def test_fashion_mnist_folder_without_the_package_says_what_to_install(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "fashion_mnist_folder.py"),
            str(tmp_path / "o"),
            "--source",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "apt-get install dataset-fashion-mnist" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "o").exists()
