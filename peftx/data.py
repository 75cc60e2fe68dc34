"""Datasets and transforms: sklearn digits (the demo), ImageFolder trees and the VTAB-1k list layout.

ImageFolder trees: a file that is not an image (by extension: ``notes.txt``, ``README``, ``.DS_Store``) is skipped
and counted (:attr:`Splits.skipped`, logged and shown by ``peftx train``); a file with an image extension that does
not parse is a corrupt image and fails, named. A tree without ``val/`` gets a validation split drawn from ``train/``
(:func:`draw_val`, after VTAB-1k's train800 / val200: seeded, stratified by class), which the run records so that
evaluation and export rebuild exactly the same split. ``peftx eval`` also reads a folder that holds only the split
it evaluates (:func:`load_eval_split`).

Every problem with the data is a ``DataError`` whose message names the file or folder at fault. Image files are
checked when the splits are built with PIL's ``Image.open(...).verify()``: it parses the header and, for PNG, walks
the chunk CRCs without decoding pixels — about 25-60 us a file here (~1 s for VTAB's ~20k test images), where a full
decode costs 0.3-1.8 ms a file (10-35 s). A file that passes that check but fails to decode later raises a DataError
naming it from ``__getitem__``.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from peftx.errors import DataError, UsageError
from peftx.image_decoding import DECODED_MODES, ImageModeError, exif_orientation, to_rgb, unsupported_mode
from peftx.preprocess import eval_transform, train_transform

from ._util import first_line
from .fsutil import write_text_atomic

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
_JUNK_FILES = frozenset({"thumbs.db", "desktop.ini"})  # OS droppings that are never meant as data
VTAB_LISTS = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
DEMO_SPECS = ("demo", "digits")
ACCEPTED_SPECS = (
    "'demo' (alias 'digits'); an ImageFolder root ROOT/train/<class>/<image> (val/ and test/ are optional: "
    "without val/, a validation split is drawn from train/); "
    "or a VTAB-1k task directory ROOT/<task>/ with train800.txt, val200.txt and test.txt"
)
IMBALANCE_WARN_RATIO = 10.0
# Validation drawn from train/ when an ImageFolder has no val/: VTAB-1k's 200 of 1,000 (20 %), per class, capped so
# that a large dataset does not spend most of each epoch validating (Fashion-MNIST's 6,000 a class would give 1,200).
VAL_FRACTION = 0.20
VAL_MAX_PER_CLASS = 100
VAL_SPLIT_FILE = "val_split.json"  # in the run directory: the drawn split, file by file
# Digits split: 25 % test, then 20 % of the rest (15 % of all) for validation, leaving 60 % for training.
_DIGITS_TEST_FRACTION = 0.25
_DIGITS_VAL_FRACTION = 0.20


@dataclass
class Splits:
    """Train / val / test datasets yielding (float CHW tensor, int label); ``test`` is None when there is none."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    class_names: list[str]
    source: str
    val_drawn: dict[str, Any] | None = None  # how val was drawn from train (seed, fraction, files), when it was
    skipped: list[Path] = field(default_factory=list)  # non-image files left out of an ImageFolder tree
    # image files per PIL mode ("RGB", "L", "I;16", "RGBA", ...) and how many carry an EXIF rotation: what the
    # decoding rule (peftx.image_decoding.to_rgb) will do to them, for the training preamble; empty for in-memory data
    image_modes: dict[str, int] = field(default_factory=dict)
    exif_rotated: int = 0


# ----------------------------------------------------------------------------------------------------- datasets


class ImageFileDataset(Dataset):
    """Images read from disk on demand."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable):
        self.samples = list(samples)
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(decode_image(path)), label


def decode_image(path: Path) -> Image.Image:
    """The image file as the 8-bit RGB image the preprocessing contract starts from: the decoding rule
    (:func:`peftx.image_decoding.to_rgb`, the file the bundle ships beside infer.py) applied to what PIL reads."""
    try:
        with Image.open(path) as im:
            return to_rgb(im, str(path))
    except ImageModeError as exc:
        raise DataError(str(exc), exc.fix) from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"{path} is not an image PIL can identify", "replace or delete the file") from exc
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... for one outcome: undecodable
        raise DataError(
            f"{path} is truncated or corrupt: {first_line(exc, 200)}", "replace or delete the file, then run again"
        ) from exc


class InMemoryImageDataset(Dataset):
    """PIL images held in memory (the digits demo)."""

    def __init__(self, images: Sequence[Image.Image], labels: Sequence[int], transform: Callable):
        self.images, self.labels, self.transform = list(images), [int(v) for v in labels], transform

    @property
    def targets(self) -> list[int]:
        return list(self.labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.labels[index]


# ----------------------------------------------------------------------------------------------------- transforms


def build_transform(data_cfg: dict[str, Any], *, train: bool, hflip: bool) -> Callable:
    """The run's preprocessing contract (:mod:`peftx.preprocess`): timm's evaluation transform for ``data_cfg``,
    with a random horizontal flip when ``train and hflip``. No random crops: VTAB-1k training uses the evaluation
    geometry, so training, evaluation and the shipped ``infer.py`` all see the same pixels."""
    return train_transform(data_cfg, hflip=True) if train and hflip else eval_transform(data_cfg)


def raw_sample(dataset: Dataset, index: int) -> tuple[Path | Image.Image, int]:
    """The undecoded sample behind ``dataset[index]``: its image file, or its in-memory PIL image, and its label.

    What the accuracy check hands to the bundle's own preprocessing, which must turn it into ``dataset[index][0]``.
    """
    if isinstance(dataset, Subset):
        return raw_sample(dataset.dataset, int(dataset.indices[index]))
    if isinstance(dataset, ImageFileDataset):
        return dataset.samples[index]
    if isinstance(dataset, InMemoryImageDataset):
        return dataset.images[index], dataset.labels[index]
    raise UsageError(
        f"{type(dataset).__name__} does not expose its raw images", "use an ImageFileDataset or InMemoryImageDataset"
    )


# ----------------------------------------------------------------------------------------------------- splits


def load_splits(
    spec: str | Path,
    data_cfg: dict[str, Any],
    *,
    hflip: bool = False,
    seed: int = 42,
    val_files: Sequence[str] | None = None,
) -> Splits:
    """Train / val / test splits for ``spec``: 'demo' (alias 'digits'), an ImageFolder root, or a VTAB-1k task dir.

    ``val_files``: for an ImageFolder without val/, the validation files a run drew (paths relative to train/, as
    recorded in its val_split.json); without them the split is drawn with ``seed`` (:func:`draw_val`).
    """
    train_tf = build_transform(data_cfg, train=True, hflip=hflip)
    eval_tf = build_transform(data_cfg, train=False, hflip=False)
    if isinstance(spec, str) and spec.strip().lower() in DEMO_SPECS:
        return _digits_splits(train_tf, eval_tf, seed)
    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"dataset {spec} does not exist", f"pass {ACCEPTED_SPECS}")
    if root.is_dir() and any((root / name).is_file() for name in VTAB_LISTS.values()):
        return _vtab_splits(root, train_tf, eval_tf)
    if root.is_dir() and (root / "train").is_dir():
        return _folder_splits(root, train_tf, eval_tf, seed, val_files)
    tasks = sorted(p.name for p in root.glob("*/") if (p / VTAB_LISTS["train"]).is_file()) if root.is_dir() else []
    if tasks:
        raise DataError(
            f"{root} is a VTAB-1k root holding {len(tasks)} task(s) ({', '.join(tasks[:5])}), not a task",
            f"pass one task directory, e.g. {root / tasks[0]}",
        )
    raise DataError(f"{root} is not a dataset peftx recognises", f"pass {ACCEPTED_SPECS}")


@dataclass
class EvalSplit:
    """One split to evaluate a trained run on, labelled with the run's class indices."""

    dataset: Dataset
    source: str
    skipped: list[Path] = field(default_factory=list)


def load_eval_split(
    spec: str | Path,
    data_cfg: dict[str, Any],
    split: str,
    class_names: Sequence[str] | None,
    *,
    seed: int = 42,
    val_files: Sequence[str] | None = None,
) -> EvalSplit:
    """The ``split`` of ``spec`` for evaluating a run trained on ``class_names``.

    Besides everything :func:`load_splits` reads (the training classes must then be the run's, in order), this
    takes a folder that holds only what is evaluated: ``ROOT/<split>/<class>/...`` (no train/), or a folder of class
    folders ``ROOT/<class>/...`` itself. Its classes are matched to the run's by NAME: a subset is fine (a class
    that is absent is simply not measured), a class the run was not trained on is refused.
    """
    root = Path(spec).expanduser() if not _is_demo(spec) else None
    partial = (
        root is not None
        and class_names is not None
        and root.is_dir()
        and not (root / "train").is_dir()
        and not any((root / name).is_file() for name in VTAB_LISTS.values())
    )
    if not partial:
        splits = load_splits(spec, data_cfg, hflip=False, seed=seed, val_files=val_files)
        if class_names is not None and list(class_names) != list(splits.class_names):
            raise DataError(
                f"{spec} has classes {_some(splits.class_names)}, the adapter was trained on {_some(class_names)}",
                "evaluate on data with the training classes, in order",
            )
        dataset = getattr(splits, split)
        if dataset is None or len(dataset) == 0:
            raise DataError(f"{spec} has no {split} split", "choose another --split")
        return EvalSplit(dataset, splits.source, splits.skipped)
    assert root is not None and class_names is not None
    folder = root / split if (root / split).is_dir() else root
    index = {name: i for i, name in enumerate(class_names)}
    skipped: list[Path] = []
    samples = _scan_split(folder, index, skipped, of_run=True)
    if not samples:
        raise DataError(f"{folder} holds no images", f"lay images out as {folder}/<class>/<image>")
    present = sorted({label for _, label in samples})
    source = (
        f"ImageFolder {folder} ({len(present)} of the run's {len(index)} classes, matched by name"
        + (f"; {len(skipped)} non-image file(s) skipped" if skipped else "")
        + ")"
    )
    return EvalSplit(ImageFileDataset(samples, build_transform(data_cfg, train=False, hflip=False)), source, skipped)


def _is_demo(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.strip().lower() in DEMO_SPECS


def _some(names: Sequence[str], n: int = 5) -> str:
    return "[" + ", ".join(map(str, list(names)[:n])) + (", ..." if len(names) > n else "") + "]"


def _digits_splits(train_tf: Callable, eval_tf: Callable, seed: int) -> Splits:
    """sklearn's 1,797 8x8 digits as RGB images, split 60/15/25 % stratified by class with ``seed``."""
    images, labels = _digit_images()  # first: it says clearly when scikit-learn is missing
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=_DIGITS_TEST_FRACTION, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=_DIGITS_VAL_FRACTION, stratify=labels[rest], random_state=seed)

    def subset(idx: np.ndarray, tf: Callable) -> InMemoryImageDataset:
        idx = np.sort(idx)
        return InMemoryImageDataset([images[i] for i in idx], labels[idx].tolist(), tf)

    return Splits(
        subset(train, train_tf),
        subset(val, eval_tf),
        subset(test, eval_tf),
        [str(d) for d in range(10)],
        f"sklearn digits (1,797 8x8 images), stratified split seed {seed}",
    )


def _digit_images() -> tuple[list[Image.Image], np.ndarray]:
    """sklearn digits (values 0-16) rescaled to 0-255 and made RGB."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split  # noqa: F401 - what the split needs, checked here
    except ImportError as exc:
        raise DataError(
            "the demo data needs scikit-learn, which is not installed", "pip install scikit-learn (or peftx[demo])"
        ) from exc
    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return [Image.fromarray(p).convert("RGB") for p in pixels], digits.target.astype(np.int64)


# ---- ImageFolder


def _folder_splits(
    root: Path, train_tf: Callable, eval_tf: Callable, seed: int, val_files: Sequence[str] | None
) -> Splits:
    classes = _class_dirs(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} holds no class folders", "lay images out as ROOT/train/<class>/<image>")
    index = {name: i for i, name in enumerate(classes)}
    skipped: list[Path] = []
    modes: Counter[str] = Counter()
    train = _scan_split(root / "train", index, skipped, modes=modes)
    counts = Counter(label for _, label in train)
    empty = [name for name, i in index.items() if counts[i] == 0]
    if empty:
        raise DataError(
            f"class folder {root / 'train' / empty[0]} has no training images"
            + (f" ({len(empty) - 1} more such)" if len(empty) > 1 else ""),
            "add images, or delete the empty class folder",
        )
    drawn = None
    if (root / "val").is_dir():
        val = _scan_split(root / "val", index, skipped, modes=modes)
    else:
        train, val, drawn = _split_val(root, train, classes, seed, val_files)
        counts = Counter(label for _, label in train)
    test = _scan_split(root / "test", index, skipped, modes=modes) if (root / "test").is_dir() else None
    for name, samples in (("val", val), ("test", test)):
        if samples is not None and not samples:
            raise DataError(f"split {root / name} holds no images", "add images, or remove the folder")
    _warn_imbalance(counts, classes, root / "train")
    if skipped:
        log.info(
            "%s: skipped %d non-image file(s), e.g. %s",
            root,
            len(skipped),
            ", ".join(str(p.relative_to(root)) for p in skipped[:3]),
        )
    source = f"ImageFolder {root} ({len(classes)} classes)"
    if drawn is not None:
        source += (
            f"; val drawn from train/: {len(val)} images ({drawn['fraction']:.0%} of each class, at most "
            f"{drawn['max_per_class']}, seed {drawn['seed']})"
        )
    return Splits(
        ImageFileDataset(train, train_tf),
        ImageFileDataset(val, eval_tf),
        ImageFileDataset(test, eval_tf) if test is not None else None,
        classes,
        source,
        drawn,
        skipped,
        image_modes=_mode_counts(modes),
        exif_rotated=modes[_ROTATED],
    )


def draw_val(
    samples: Sequence[tuple[Path, int]],
    class_names: Sequence[str],
    seed: int,
    fraction: float = VAL_FRACTION,
    max_per_class: int = VAL_MAX_PER_CLASS,
) -> set[Path]:
    """The validation images drawn from ``samples`` (training images), stratified by class.

    Each class gives ``min(max_per_class, round(fraction * n))`` of its n images, at least 1 when n >= 2 and never
    all of them (a class with one image keeps it for training). Each class is shuffled by its own generator, seeded
    with (seed, crc32 of the class name): adding images to one class does not change another class's draw.
    """
    by_class: dict[int, list[Path]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    chosen: set[Path] = set()
    for label, paths in sorted(by_class.items()):
        n = len(paths)
        k = 0 if n < 2 else min(n - 1, max(1, min(max_per_class, round(fraction * n))))
        rng = np.random.default_rng([seed, zlib.crc32(class_names[label].encode("utf-8"))])
        chosen.update(sorted(paths)[i] for i in rng.permutation(n)[:k])
    return chosen


def _split_val(
    root: Path, train: list[tuple[Path, int]], classes: list[str], seed: int, val_files: Sequence[str] | None
) -> tuple[list, list, dict[str, Any]]:
    """(train, val, record) for a tree without val/: the recorded files if given, else a fresh draw."""
    base = root / "train"
    if val_files is not None:
        known = {path.relative_to(base).as_posix(): path for path, _ in train}
        gone = [f for f in val_files if f not in known]
        if gone:
            raise DataError(
                f"{base / gone[0]}, a validation image the run drew from train/, is no longer there"
                + (f" ({len(gone) - 1} more)" if len(gone) > 1 else ""),
                f"restore it, or pass a dataset with a val/ folder (the run's split is its {VAL_SPLIT_FILE})",
            )
        chosen = {known[f] for f in val_files}
    else:
        chosen = draw_val(train, classes, seed)
    if not chosen:
        raise DataError(
            f"ImageFolder dataset {root} has no val/ folder, and too few training images to draw one "
            "(every class has a single image)",
            "add images (2 or more per class), or create ROOT/val/<class>/...",
        )
    val = [(p, label) for p, label in train if p in chosen]
    rest = [(p, label) for p, label in train if p not in chosen]
    record = {
        "from": "train",
        "seed": seed,
        "fraction": VAL_FRACTION,
        "max_per_class": VAL_MAX_PER_CLASS,
        "recorded": val_files is not None,
        "files": [p.relative_to(base).as_posix() for p, _ in val],
    }
    return rest, val, record


def write_val_split(run_dir: str | Path, drawn: dict[str, Any]) -> Path:
    """The drawn split as ``RUN_DIR/val_split.json`` (rule, seed, and every file relative to train/)."""
    record = {k: v for k, v in drawn.items() if k != "recorded"}
    return write_text_atomic(Path(run_dir) / VAL_SPLIT_FILE, json.dumps(record, indent=1) + "\n")


def read_val_split(run_dir: str | Path) -> list[str] | None:
    """The validation files a run drew (relative to train/), or None when it did not draw one."""
    path = Path(run_dir) / VAL_SPLIT_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path} is unreadable ({first_line(exc, 200)})",
            "restore it from the run directory, or delete it to draw the split again from the seed",
        ) from exc
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise DataError(f"{path} does not list files", "restore it, or delete it to draw the split again")
    return files


def _class_dirs(split: Path) -> list[str]:
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_split(
    split: Path,
    index: dict[str, int],
    skipped: list[Path] | None = None,
    *,
    of_run: bool = False,
    modes: Counter[str] | None = None,
) -> list[tuple[Path, int]]:
    """(image, label) pairs of one split folder, every image checked; non-image files go to ``skipped``, the images'
    PIL modes are counted in ``modes``. ``of_run``: ``index`` is a trained run's classes (evaluation), not this
    tree's train/ folder."""
    unknown = [name for name in _class_dirs(split) if name not in index]
    if unknown:
        known = f"{', '.join(list(index)[:8])}{', ...' if len(index) > 8 else ''}"
        raise DataError(
            f"class folder {split / unknown[0]} is not a training class",
            f"the run was trained on the classes {known}: remove or rename the others"
            if of_run
            else f"every {split.name}/ class must also exist under train/ (training classes: {known})",
        )
    samples: list[tuple[Path, int]] = []
    for path in sorted(split.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(split)
        if _is_junk(rel) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            if skipped is not None:
                skipped.append(path)
            continue
        if len(rel.parts) < 2:
            raise DataError(f"{path} is not inside a class folder", f"move it to {split}/<class>/")
        _check_image(path, modes)
        samples.append((path, index[rel.parts[0]]))
    return samples


def _is_junk(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts) or rel.name.lower() in _JUNK_FILES


def _check_image(path: Path, modes: Counter[str] | None = None) -> None:
    """Cheap integrity check (header + PNG chunk CRCs, no pixel decode); see the module docstring for the cost.
    A PIL mode the decoding rule does not read is refused here, before training; ``modes`` counts the modes (and,
    under ``_ROTATED``, the files an EXIF orientation will turn)."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(
            f"{path} is not an image file (extension {path.suffix or 'none'})",
            f"remove it, or use one of: {', '.join(sorted(IMAGE_EXTENSIONS))}",
        )
    try:
        with Image.open(path) as im:
            mode, rotated = im.mode, exif_orientation(im) != 1
            im.verify()
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError...: one outcome, unreadable
        raise DataError(
            f"{path} is not a readable image ({first_line(exc, 200)})", "replace or delete the file"
        ) from exc
    if mode not in DECODED_MODES:
        refused = unsupported_mode(str(path), mode)
        raise DataError(str(refused), refused.fix)
    if modes is not None:
        modes[mode] += 1
        modes[_ROTATED] += rotated


_ROTATED = "exif-rotated"  # a key of the mode counter that is not a mode: files an EXIF orientation turns


def _mode_counts(modes: Counter[str]) -> dict[str, int]:
    """Image files per PIL mode, most first."""
    return {mode: n for mode, n in modes.most_common() if mode != _ROTATED and n}


# ---- VTAB-1k


# The head has 1 + max(label) outputs. VTAB-1k tasks have at most 397 classes and ImageNet-21k 21,843; a label past
# this bound is a damaged list (a width or id column read as the label), not a task: refuse it before building a
# head of that size (1e9 classes would be a MemoryError several lines later).
MAX_CLASSES = 100_000


def parse_vtab_list(path: str | Path, root: str | Path) -> list[tuple[Path, int]]:
    """Parse a VTAB-1k list file (lines ``relative/path label``); paths are relative to ``root`` and must stay in it.

    Refuses, with ``file:line``: malformed lines, non-integer or negative labels, absolute paths, paths that leave
    ``root`` (``..`` or a symlink resolving outside) and files that do not exist.
    """
    path, root = Path(path), Path(root)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read list file {path}: {first_line(exc, 200)}", "check the VTAB-1k layout") from exc
    real_root = root.resolve()
    samples: list[tuple[Path, int]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line:
            samples.append(_parse_vtab_line(line, f"{path}:{lineno}", root, real_root))
    return samples


def _parse_vtab_line(line: str, where: str, root: Path, real_root: Path) -> tuple[Path, int]:
    fields = line.rsplit(None, 1)  # the label is the last field; paths may contain spaces
    if len(fields) != 2:
        raise DataError(f"{where}: expected 'relative/path label', got {line!r}", "fix or delete the line")
    rel, label_text = fields
    try:
        label = int(label_text)
    except ValueError:
        raise DataError(f"{where}: label {label_text!r} is not an integer", "labels are class indices 0..K-1") from None
    if label < 0:
        raise DataError(f"{where}: label {label} is negative", "labels are class indices 0..K-1")
    if label >= MAX_CLASSES:
        raise DataError(
            f"{where}: label {label} is not a plausible class index (the head would have {label + 1:,} outputs)",
            f"labels are class indices 0..K-1 with K <= {MAX_CLASSES:,}",
        )
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise DataError(f"{where}: path {rel!r} is absolute", "list paths relative to the task directory")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise DataError(f"{where}: path {rel!r} leaves the task directory", "list paths inside the task directory")
    full = root / rel
    try:
        real = full.resolve()
        is_file = real.is_relative_to(real_root) and real.is_file()
    # a NUL byte (ValueError), a name too long (OSError), a symlink loop (RuntimeError before Python 3.13)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"{where}: path {rel!r} is not a usable file name ({first_line(exc, 200)})", "fix or delete the line"
        ) from None
    if not real.is_relative_to(real_root):
        raise DataError(
            f"{where}: path {rel!r} resolves outside the task directory (to {real})",
            "copy the image into the task directory instead of linking out of it",
        )
    if not is_file:
        raise DataError(f"{where}: image {full} does not exist", "fix the path, or restore the file")
    return full, label


def _vtab_splits(root: Path, train_tf: Callable, eval_tf: Callable) -> Splits:
    missing = [name for name in VTAB_LISTS.values() if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"VTAB-1k task {root} has no {', '.join(missing)}",
            f"a task directory needs {', '.join(VTAB_LISTS.values())}",
        )
    lists = {split: parse_vtab_list(root / name, root) for split, name in VTAB_LISTS.items()}
    for split, samples in lists.items():
        if not samples:
            raise DataError(f"split file {root / VTAB_LISTS[split]} lists no images", "check the VTAB-1k layout")
    modes: Counter[str] = Counter()
    for samples in lists.values():
        for image, _ in samples:
            _check_image(image, modes)
    num_classes = 1 + max(label for samples in lists.values() for _, label in samples)
    counts = Counter(label for _, label in lists["train"])
    # VTAB-1k samples 800 training images per task, so many-class tasks (SUN397: 397 classes) cannot cover every
    # class: an uncovered label is the benchmark's design, not a broken file. Warn rather than refuse.
    uncovered = sorted({label for s in ("val", "test") for _, label in lists[s]} - set(counts))
    if uncovered:
        log.warning(
            "%s: %d label(s) in val/test have no training image in %s (e.g. %s)",
            root,
            len(uncovered),
            VTAB_LISTS["train"],
            ", ".join(map(str, uncovered[:5])),
        )
    names = [str(i) for i in range(num_classes)]
    _warn_imbalance(counts, names, root / VTAB_LISTS["train"])
    return Splits(
        ImageFileDataset(lists["train"], train_tf),
        ImageFileDataset(lists["val"], eval_tf),
        ImageFileDataset(lists["test"], eval_tf),
        names,
        f"VTAB-1k task {root.name} ({root}; train800 / val200 / test)",
        image_modes=_mode_counts(modes),
        exif_rotated=modes[_ROTATED],
    )


# ---- shared


def _warn_imbalance(counts: Counter, class_names: Sequence[str], where: Path) -> None:
    present = {label: n for label, n in counts.items() if n > 0}
    if len(present) < 2:
        return
    big, small = max(present, key=lambda c: present[c]), min(present, key=lambda c: present[c])
    if present[big] > IMBALANCE_WARN_RATIO * present[small]:
        log.warning(
            "%s is imbalanced: class %s has %d training images, class %s only %d (> %gx)",
            where,
            class_names[big],
            present[big],
            class_names[small],
            present[small],
            IMBALANCE_WARN_RATIO,
        )


# ----------------------------------------------------------------------------------------------------- real images


def sample_photos() -> list[Image.Image]:
    """scikit-learn's two RGB sample photos (china.jpg, flower.jpg; 427x640), shipped inside the package."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise DataError(
            "the sample photos need scikit-learn, which is not installed", "pip install scikit-learn (or peftx[demo])"
        ) from exc
    return [Image.fromarray(array) for array in load_sample_images().images]


def real_images(n: int, data_cfg: dict[str, Any], seed: int = 0) -> torch.Tensor:
    """A [n, 3, H, W] batch of real images preprocessed with ``data_cfg``, for parity checks.

    The two sample photos first, then alternately a seeded crop (35-90 % of each side, flipped half the time) of a
    photo and an upscaled sklearn digit, until ``n`` are reached. The same (n, cfg, seed) always gives the same batch.
    """
    if n < 1:
        raise UsageError(f"real_images needs n >= 1, got {n}")
    transform = build_transform(data_cfg, train=False, hflip=False)
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    images: list[Image.Image] = photos[:n]
    digits: list[Image.Image] | None = None
    while len(images) < n:
        if len(images) % 2 == 0:
            images.append(_random_crop(photos[len(images) // 2 % len(photos)], rng))
        else:
            digits = digits if digits is not None else _digit_images()[0]
            images.append(digits[int(rng.integers(len(digits)))])
    return torch.stack([transform(image) for image in images])


def images_from_dir(directory: str | Path, data_cfg: dict[str, Any], *, limit: int | None = None) -> torch.Tensor:
    """A [n, 3, H, W] batch of the images under ``directory`` (recursive, sorted by path; at most ``limit``),
    preprocessed with ``data_cfg``: a user's own real images for parity checks."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"image directory {root} does not exist", "pass a directory of .jpg/.png images")
    paths = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not _is_junk(p.relative_to(root))
    )
    paths = paths[:limit] if limit is not None else paths
    if not paths:
        raise DataError(
            f"image directory {root} holds no images", f"add files with one of: {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    dataset = ImageFileDataset([(p, 0) for p in paths], build_transform(data_cfg, train=False, hflip=False))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def labelled_folder(directory: str | Path, class_names: Sequence[str], data_cfg: dict[str, Any]) -> Dataset | None:
    """A user's own labelled images for the accuracy check: ``DIR/<class>/<image>`` (or ``DIR/test/<class>/...``,
    ``DIR/val/<class>/...``) with the run's class names, preprocessed with ``data_cfg``. None when no folder there is
    one of the run's classes (unlabelled images: parity only). A class folder the run does not know is a DataError."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"image directory {root} does not exist", "pass a directory of .jpg/.png images")
    index = {name: i for i, name in enumerate(class_names)}
    for candidate in (root, root / "test", root / "val"):
        if candidate.is_dir() and any(name in index for name in _class_dirs(candidate)):
            samples = _scan_split(candidate, index)
            if not samples:
                raise DataError(f"{candidate} holds no images", "add images under <class>/ folders")
            return ImageFileDataset(samples, build_transform(data_cfg, train=False, hflip=False))
    return None


def _random_crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = photo.size
    w, h = (int(side * rng.uniform(0.35, 0.9)) for side in (width, height))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    crop = photo.crop((left, top, left + w, top + h))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop
