"""Merge-export and validate: the library side of ``peftx merge-export`` and ``peftx validate``.

Rebuilds the UNMERGED adapted model from a run directory (or an adapter file plus a backbone spec), merges it into a
plain timm model, and hands both to :mod:`peftx.exports.bundle`, which exports, checks every artifact against the
unmerged model on real images, and writes the bundle atomically. The accuracy gate measures the run's test split
(val when there is none, or a labelled ``--images`` folder): the unmerged model through the run's recorded
transform, every artifact through the bundle's own infer.py from the raw files. ``--precision int8`` calibrates on
the run's TRAINING split (``--calibration-data DIR`` when it moved), never on the images the gate measures.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch

from . import __version__
from .adapter_io import ADAPTER_FILE
from .data import (
    IMAGE_EXTENSIONS,
    ImageFileDataset,
    build_transform,
    images_from_dir,
    labelled_folder,
    load_splits,
    raw_sample,
    real_images,
)
from .errors import AdapterFileError, AdapterMismatchError, DataError, ExportError, UsageError
from .evaluate import run_val_files
from .events import Progress, steps_to
from .exports import int8
from .exports.accuracy import select
from .exports.bundle import _check_destination as check_destination
from .exports.bundle import read_bundle, validate_bundle, write_bundle
from .exports.int8 import select_calibration
from .exports.tensorrt import resolve_target_here
from .fsutil import sha256_file, write_text_atomic
from .preprocess import contract
from .sources import Loaded, Source, load_source, recorded_source

Precision = Literal["fp32", "fp16", "int8"]
TensorRTMode = Literal["auto", "on", "off"]

PARITY_IMAGES = 16  # real images per parity run: enough for odd batch sizes 1, 3, 7 plus a full batch
# Labelled images the accuracy gate measures by default (a seeded subset of a larger split): resolves 0.2 points,
# covers the demo's whole test split (450), and bounds the CPU cost of a big test split (VTAB's ~20k images) to
# a few minutes per artifact at ViT-B/16 224 px. --accuracy-images all measures every image.
ACCURACY_IMAGES = 500
BUNDLE_DIR = "bundle"


def _adapter_path(source: str | Path) -> Path:
    source = Path(source)
    return source / ADAPTER_FILE if source.is_dir() else source


def load_reference(
    source: str | Path | Source,
    *,
    model_name: str | None = None,
    weights: str | Path | None = None,
    img_size: int | None = None,
) -> Loaded:
    """The unmerged model of ``source``: a run directory or adapter file (``model_name``/``weights`` override its
    spec), a peft adapter directory, or a source object (:mod:`peftx.sources`)."""
    loaded = load_source(source, model_name=model_name, weights=weights, img_size=img_size)
    loaded.data_config = contract(loaded.data_config)  # its recorded preprocessing, or timm's eval config
    return loaded


def _run_splits(loaded: Loaded):
    """The run's own splits (its recorded data, preprocessing, split seed and the validation files it drew from
    train/), or the DataError why not."""
    data = loaded.config.get("data")
    if not data:
        return DataError("the adapter does not record its training data")
    seed = loaded.config.get("seed")
    try:
        splits = load_splits(
            data,
            loaded.data_config,
            seed=seed if isinstance(seed, int) else 42,
            val_files=run_val_files(loaded.config, loaded.adapter_path, data),
        )
    except DataError as exc:
        return exc
    if list(splits.class_names) != list(loaded.class_names):
        return DataError(f"{data} now has other classes than the run was trained on")
    return splits


def parity_images(
    loaded: Loaded, images_dir: str | Path | None = None, n: int = PARITY_IMAGES, splits: Any = None
) -> torch.Tensor:
    """REAL images for parity: ``images_dir`` if given, else the run's validation split, else the shipped photos."""
    if images_dir is not None:
        return images_from_dir(images_dir, loaded.data_config, limit=n)
    splits = _run_splits(loaded) if splits is None else splits
    if not isinstance(splits, DataError):
        val = splits.val
        return torch.stack([val[i][0] for i in range(min(n, len(val)))])
    return real_images(n, loaded.data_config)  # the training data moved or is gone: the registry-shipped photos


def parse_count(text: str | int | None, option: str = "--accuracy-images") -> int | None:
    """'500' -> 500, 'all' -> None (every image), '0' -> 0 (skip)."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "all"):
        return None
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"{option} {text!r} is not a count", f"e.g. {option} 500, or all, or 0 to skip") from None
    if value < 0:
        raise UsageError(f"{option} {value} is negative", f"e.g. {option} 500, or all, or 0 to skip")
    return value


def accuracy_images(
    loaded: Loaded, images_dir: str | Path | None = None, limit: int | None = ACCURACY_IMAGES, splits: Any = None
):
    """(AccuracySet or None, why not): a labelled ``images_dir`` (``DIR/<class>/...``), else the run's test split,
    else its val split; ``limit`` images at most (None: all; 0: not measured)."""
    if limit == 0:
        return None, "--accuracy-images 0"
    if images_dir is not None:
        own = labelled_folder(images_dir, loaded.class_names, loaded.data_config)
        if own is not None:
            return select(own, f"labelled images in {images_dir}", limit), None
    splits = _run_splits(loaded) if splits is None else splits
    if isinstance(splits, DataError):
        return None, f"no labelled images: {splits.message}"
    name, dataset = ("test", splits.test) if splits.test is not None and len(splits.test) else ("val", splits.val)
    return select(dataset, f"{name} split of {splits.source}", limit), None


def provenance(loaded: Loaded) -> dict[str, Any]:
    c = loaded.config
    return {
        "adapter_file": str(loaded.adapter_path.absolute()),
        "adapter_sha256": sha256_file(loaded.adapter_path),
        "method": c.get("method"),
        "adapter_config": c.get("config"),
        "base_model": c.get("base_model"),
        "base_fingerprint": c.get("base_fingerprint"),
        "backbone_spec": c.get("spec"),
        "num_classes": c.get("num_classes"),
        "trainable_params": c.get("trainable_params"),
        "peftx_version": __version__,
    }


def parse_batch(text: str) -> tuple[int, int, int]:
    """'MIN:OPT:MAX' (or one number for all three) -> (min, opt, max)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        raise UsageError(f"--batch {text!r} is not MIN:OPT:MAX", "e.g. --batch 1:8:32") from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
        raise UsageError(f"--batch {text!r}: need 1 <= MIN <= OPT <= MAX", "e.g. --batch 1:8:32")
    return parts[0], parts[1], parts[2]


def merge_export(
    source: str | Path | Source,
    *,
    output: str | Path | None = None,
    batch: Sequence[int] = (1, 8, 32),
    precision: str = "fp32",
    tensorrt: str = "auto",
    force: bool = False,
    simplify: bool = True,
    model_name: str | None = None,
    weights: str | Path | None = None,
    img_size: int | None = None,
    images_dir: str | Path | None = None,
    progress: Progress | None = None,
    target: str | None = None,
    accuracy_limit: int | None = ACCURACY_IMAGES,
    calibration: int | None = None,
    calibration_method: str = "minmax",
    calibration_data: str | Path | None = None,
):
    """Load, merge, export, validate; returns the :class:`~peftx.exports.bundle.BundleReport`.

    ``target`` is a deployment target (``peftx targets``: trt8.5, jetpack6, ..., "auto"; None: the default).
    ``accuracy_limit``: labelled images for the accuracy gate (None: all of the split; 0: not measured).
    ``precision="int8"``: ``calibration`` images (default ``int8.CALIBRATION_IMAGES``) of the run's training split
    or of ``calibration_data``, seeded and class-stratified, calibrated with ``calibration_method``.
    Raises ParityError (after writing a bundle marked failed) when any artifact disagrees with the unmerged model
    or loses accuracy beyond its tolerance.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise UsageError(f"--precision {precision!r}", "choose fp32, fp16 or int8")
    if tensorrt not in ("auto", "on", "off"):
        raise UsageError(f"--tensorrt {tensorrt!r}", "choose auto, on or off")
    profile = resolve_target_here(target)  # an unknown target fails here, before the model is loaded
    count = int8.CALIBRATION_IMAGES if calibration is None else calibration
    if precision == "int8":  # every INT8 argument fails here too
        int8.check_target(profile)
        int8.check_method(calibration_method)
        if count < int8.MIN_CALIBRATION_IMAGES:
            raise UsageError(
                f"--calibration {count}: at least {int8.MIN_CALIBRATION_IMAGES} images are needed",
                f"pass --calibration {int8.CALIBRATION_IMAGES} (the default) or more",
            )
        if accuracy_limit == 0:
            raise UsageError(
                "--precision int8 with --accuracy-images 0: task accuracy is the only honest INT8 gate",
                "drop --accuracy-images 0",
            )
    elif calibration is not None or calibration_data is not None:
        raise UsageError(
            "--calibration and --calibration-data are for --precision int8", "add --precision int8, or drop them"
        )
    early = (
        Path(output)
        if output
        else _adapter_path(source).parent / BUNDLE_DIR
        if isinstance(source, (str, Path))
        else None
    )
    if early is not None:  # an existing bundle is refused before any work
        check_destination(early, force)
    say = steps_to(progress)
    say("loading the backbone and adapter")
    loaded = load_reference(source, model_name=model_name, weights=weights, img_size=img_size)
    out = Path(output) if output else loaded.adapter_path.parent / BUNDLE_DIR
    say("merging")
    merged = loaded.merge(loaded.model)
    splits = _run_splits(loaded)
    images = parity_images(loaded, images_dir, splits=splits)
    labelled = _accuracy_set(loaded, images_dir, accuracy_limit, splits, say)
    request = (
        _calibration_request(loaded, splits, calibration_data, count, calibration_method)
        if precision == "int8"
        else None
    )
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        _remember_bundle(Path(source), out)  # for `peftx validate RUN` when the bundle is not RUN/bundle
    return write_bundle(
        loaded.model,
        merged,
        out,
        input_size=tuple(loaded.data_config["input_size"]),
        data_config=loaded.data_config,
        class_names=loaded.class_names,
        provenance=provenance(loaded),
        images=images,
        batch=(batch[0], batch[1], batch[2]),
        precision=cast(Precision, precision),  # checked above
        tensorrt=cast(TensorRTMode, tensorrt),
        simplify=simplify,
        force=force,
        progress=say,
        target=profile,
        accuracy_set=labelled,
        int8=request,
    )


def _calibration_request(loaded: Loaded, splits: Any, directory: str | Path | None, n: int, method: str):
    """INT8 calibration images: the run's training split (seeded with the run's seed, class-stratified), or the
    images under ``directory`` (an ImageFolder root's train/, class folders, or a flat folder)."""
    seed = loaded.config.get("seed")
    seed = seed if isinstance(seed, int) else 42
    if directory is not None:
        dataset, source = _calibration_folder(Path(directory), loaded)
    elif isinstance(splits, DataError):
        data = loaded.config.get("data") or "not recorded"
        raise DataError(
            f"INT8 calibration needs the run's training images (data {data}): {splits.message}",
            "pass --calibration-data DIR with training images (DIR/<class>/... or an ImageFolder root)",
        )
    else:
        dataset, source = splits.train, f"train split of {splits.source}"
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = [raw_sample(dataset, i)[1] for i in range(len(dataset))]
    return select_calibration(dataset, list(labels), n, seed, source, method)


def _calibration_folder(directory: Path, loaded: Loaded):
    """(dataset, source) of the images under ``directory`` (its train/ when it is an ImageFolder root); labels are
    their class folders (only used to stratify the draw)."""
    root = directory / "train" if (directory / "train").is_dir() else directory
    if not root.is_dir():
        raise DataError(
            f"calibration directory {directory} does not exist", "pass --calibration-data DIR with training images"
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    folders = {folder: i for i, folder in enumerate(sorted({p.parent for p in files}))}
    samples = [(p, folders[p.parent]) for p in files]
    return ImageFileDataset(samples, build_transform(loaded.data_config, train=False, hflip=False)), f"images in {root}"


def _accuracy_set(loaded: Loaded, images_dir, limit, splits, say: Callable[[str], None]):
    labelled, why_not = accuracy_images(loaded, images_dir, limit, splits)
    if labelled is None:
        say(f"accuracy not measured ({why_not})")
    return labelled


BUNDLES_FILE = "bundles.json"  # in a run directory: every bundle merge-export wrote from it (-o elsewhere included)


def _remember_bundle(run_dir: Path, out: Path) -> None:
    """Add ``out`` to RUN_DIR/bundles.json (best effort: a read-only run directory just goes without)."""
    record = run_dir / BUNDLES_FILE
    try:
        known = json.loads(record.read_text(encoding="utf-8")) if record.exists() else []
        paths = [str(p) for p in known if isinstance(p, str)] if isinstance(known, list) else []
        where = str(out.absolute())
        write_text_atomic(record, json.dumps([*(p for p in paths if p != where), where], indent=1) + "\n")
    except (OSError, ValueError):
        pass


def bundles_of(run_dir: Path) -> list[Path]:
    """The bundles made from the run in ``run_dir`` that exist now: those RUN_DIR/bundles.json records, and those
    next to the run or in the working directory (one or two levels down) whose metadata.json names its adapter."""
    adapter = (run_dir / ADAPTER_FILE).resolve()
    candidates: list[Path] = []
    try:
        recorded = json.loads((run_dir / BUNDLES_FILE).read_text(encoding="utf-8"))
        candidates += [Path(p) for p in recorded if isinstance(p, str)] if isinstance(recorded, list) else []
    except (OSError, ValueError):
        pass
    for base in dict.fromkeys((run_dir.absolute().parent, Path.cwd())):
        for pattern in ("*/metadata.json", "*/*/metadata.json"):
            candidates += [m.parent for m in sorted(base.glob(pattern))[:200]]
    found: list[Path] = []
    for bundle in dict.fromkeys(c.absolute() for c in candidates):
        try:
            meta = json.loads((bundle / "metadata.json").read_text(encoding="utf-8"))
            made_from = (meta.get("provenance") or {}).get("adapter_file")
        except (OSError, ValueError, AttributeError):
            continue
        if made_from and Path(made_from).resolve() == adapter and bundle not in found:
            found.append(bundle)
    return found


def bundle_dir(path: str | Path) -> Path:
    """The bundle to validate: ``path`` itself, or RUN_DIR/bundle for a run directory (what merge-export writes
    by default), so that ``validate`` takes what ``merge-export`` took. A run whose bundles were written elsewhere
    (``-o DIR``) is refused with their paths."""
    path = Path(path)
    if (path / "metadata.json").exists() or not (path / ADAPTER_FILE).exists():
        return path
    if (path / BUNDLE_DIR / "metadata.json").exists():
        return path / BUNDLE_DIR
    elsewhere = bundles_of(path)
    if elsewhere:
        listed = ", ".join(str(b) for b in elsewhere[:4]) + (", ..." if len(elsewhere) > 4 else "")
        raise ExportError(
            f"{path} has no {BUNDLE_DIR}/ of its own; its {'bundle is' if len(elsewhere) == 1 else 'bundles are'} "
            f"{listed}",
            f"validate one: peftx validate {elsewhere[0]}",
        )
    raise ExportError(
        f"{path} is a run directory without a bundle ({path / BUNDLE_DIR} does not exist, and none made from it "
        "was found next to it)",
        f"export it first: peftx merge-export {path}, or pass the bundle directory itself",
    )


def validate(
    bundle: str | Path,
    *,
    images_dir: str | Path | None = None,
    adapter: str | Path | None = None,
    weights: str | Path | None = None,
    tensorrt: str = "auto",
    progress: Progress | None = None,
    target: str | None = None,
    accuracy_limit: int | None = ACCURACY_IMAGES,
):
    """Re-run the readiness (for ``target``, default the bundle's own), parity and accuracy checks of an existing
    bundle against the unmerged model it was made from."""
    if tensorrt not in ("auto", "on", "off"):
        raise UsageError(f"--tensorrt {tensorrt!r}", "choose auto, on or off")
    if target is not None:
        resolve_target_here(target)  # an unknown target fails before anything is loaded
    bundle = bundle_dir(bundle)
    meta = read_bundle(bundle)
    prov = meta.get("provenance") or {}
    source = adapter or prov.get("adapter_file")
    if not source or not Path(source).exists():
        raise AdapterFileError(
            f"the adapter this bundle was made from ({source}) is not available",
            "pass --adapter PATH to the run directory or adapter file",
        )
    if adapter is None and prov.get("adapter_sha256") and sha256_file(source) != prov["adapter_sha256"]:
        raise AdapterMismatchError(
            f"{source} changed since the bundle was made (sha256 differs)",
            "pass --adapter with the adapter the bundle was made from, or re-export",
        )
    loaded = load_reference(recorded_source(prov, source), weights=weights)
    say = steps_to(progress)
    splits = _run_splits(loaded)
    return validate_bundle(
        bundle,
        loaded.model,
        parity_images(loaded, images_dir, splits=splits),
        tensorrt=cast(TensorRTMode, tensorrt),  # checked above
        progress=say,
        target=target,
        accuracy_set=_accuracy_set(loaded, images_dir, accuracy_limit, splits, say),
    )
