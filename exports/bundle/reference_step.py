"""Step: the bundle's reference set, real preprocessed images with the UNMERGED model's outputs, for the device to check
itself against (``python infer.py --check``) with numpy and ONNX Runtime or TensorRT only.

``reference_set.npz`` (numpy arrays only: it loads with ``np.load(allow_pickle=False)``) holds

* ``inputs``            float32 [N, 3, H, W]: REAL images (the run's test/val files when they are on disk) through the
                        bundle's own infer.py preprocessing, as the device feeds them;
* ``reference_logits``  float32 [N, C]: the unmerged PyTorch model on exactly those inputs (not the merged one: the
                        check covers the merge as well as the export);
* ``labels``            int64 [N]: their labels (-1: unknown, when only unlabelled images were there);
* ``raw_files``, ``raw_index``: a few of those images as the files themselves (``reference/``, the smallest, so the
                        bundle stays small) and the row of ``inputs`` each must preprocess to on the device;
* ``raw_decoded_sha256``: sha256 of the pixels each raw file decodes to here (infer.py's ``decoded_digest``), so the
                        device tells its own JPEG decoder's differences from a preprocessing difference.

metadata.json's ``reference_set`` names the files and records the tolerances the check applies, per precision, from
:mod:`peftx.tolerances` (``CHECK_TOLERANCES``: an artifact of a new precision adds its entry there).
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftx.data import raw_sample
from peftx.tolerances import FP16, INT8_ON_DEVICE, ONNX_FP32, PREPROCESSING_ATOL, TENSORRT_FP32, Tolerance

from ..accuracy import AccuracySet, load_infer_module
from ..runners import TorchRunner
from .artifacts import _int8_runners
from .format import INT8_FILE
from .precision import quantized
from .request import BundleRequest, Progress

REFERENCE_FILE, RAW_DIR = "reference_set.npz", "reference"
# Two dozen images: top-1 agreement resolves one flip in 24 and every class of a small task appears; at 224 px the
# float32 inputs are ~14 MB, at the demo's size well under 1 MB.
REFERENCE_IMAGES = 24
# A few raw files suffice to show the device's PIL/numpy decode and resize as here; the smallest are taken, within a
# byte budget, so a bundle of large photos does not grow by megabytes.
REFERENCE_RAW_FILES = 4
RAW_BYTES_BUDGET = 1 << 20
# The tolerance infer.py --check applies per artifact: the key is the precision of an ONNX file (infer.py's
# PRECISION_ARTIFACTS) or tensorrt_<precision> for an engine built on the device; the same bounds parity used.
# INT8: against the INT8 graph's own outputs here (``int8_logits``), not the unmerged model's: its logits move by
# design, and the bundle's accuracy gate judged the quantisation; on the device the check flags a graph or engine
# that does not compute what was judged (e.g. a calibration lost in the build).
CHECK_TOLERANCES: dict[str, Tolerance] = {
    "fp32": ONNX_FP32,
    "fp16": FP16,
    "tensorrt_fp32": TENSORRT_FP32,
    "tensorrt_fp16": FP16,
    "int8": INT8_ON_DEVICE,
    "tensorrt_int8": INT8_ON_DEVICE,
}


def _reference_step(
    work: Path, reference: torch.nn.Module, opt: BundleRequest, images: np.ndarray, fp32: Tolerance, say: Progress
) -> dict[str, Any]:
    """reference_set.npz (+ reference/) in ``work``, for ``infer.py --check`` (infer.py must be there: its
    preprocessing makes the inputs); returns metadata.json's ``reference_set`` entry."""
    say("writing the reference set (infer.py --check)")
    preprocessing = json.loads(json.dumps(opt.preprocessing))
    int8_graph = work / INT8_FILE if quantized(opt.precision) else None
    return write_reference_set(work, reference, preprocessing, opt.accuracy_set, images, fp32=fp32, int8=int8_graph)


def write_reference_set(
    work: Path,
    reference: torch.nn.Module,
    preprocessing: Mapping[str, Any],
    accuracy_set: AccuracySet | None,
    images: np.ndarray,
    *,
    n: int = REFERENCE_IMAGES,
    raw_files: int = REFERENCE_RAW_FILES,
    fp32: Tolerance | None = None,
    int8: Path | None = None,
) -> dict[str, Any]:
    """Write reference_set.npz (+ reference/ raw files) into the bundle directory ``work``; return metadata.json's
    ``reference_set`` entry. ``accuracy_set`` (labelled images with raw files) is preferred; without it the parity
    ``images`` (real, already preprocessed, unlabelled) are used and no raw file ships. ``fp32``: the FP32 ONNX
    tolerance parity used (derived from this model's measured FP32 noise), recorded for the device's check. ``int8``:
    the bundle's Q/DQ graph as shipped, whose exact outputs on the inputs (``int8_logits``) the device's INT8 runs are
    checked against."""
    prep = dict(preprocessing)
    if accuracy_set is not None and len(accuracy_set):
        inputs, labels, raws, source = _from_labelled(work, accuracy_set, prep, n)
    else:
        inputs, labels, raws = np.ascontiguousarray(images[:n], dtype=np.float32), np.full(min(n, len(images)), -1), []
        source = "the parity images (no labelled images with files on disk)"
    chosen = _smallest(raws, raw_files)
    if chosen:
        (work / RAW_DIR).mkdir()
    names = [_copy_raw(raw, work / RAW_DIR, k) for k, (_, raw) in enumerate(chosen)]
    # what each raw file decodes to here: on the device, a file its Pillow decodes otherwise (another libjpeg) is told
    # apart from a preprocessing difference (infer.py --check)
    shipped = load_infer_module(work / "infer.py") if names else None
    digests = [shipped.decoded_digest(shipped.load_image(work / name)) for name in names] if shipped else []
    with TorchRunner(reference, name="unmerged PyTorch") as runner:
        logits = np.concatenate([runner.infer(inputs[i : i + 32]) for i in range(0, len(inputs), 32)])
    arrays: dict[str, Any] = {
        "inputs": inputs,
        "reference_logits": logits.astype(np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
        "raw_files": np.asarray(names, dtype=str) if names else np.zeros(0, dtype="<U1"),
        "raw_index": np.asarray([row for row, _ in chosen], dtype=np.int64),
        "raw_decoded_sha256": np.asarray(digests, dtype=str) if digests else np.zeros(0, dtype="<U1"),
    }
    if int8 is not None:
        with _int8_runners(int8)[0] as exact:  # the Q/DQ arithmetic TensorRT performs, as the gate measured it
            int8_logits = np.concatenate([exact.infer(inputs[i : i + 32]) for i in range(0, len(inputs), 32)])
        arrays["int8_logits"] = int8_logits.astype(np.float32)
    np.savez_compressed(work / REFERENCE_FILE, **arrays)
    return {
        "file": REFERENCE_FILE,
        "images": int(len(inputs)),
        "source": source,
        "labels": bool((np.asarray(labels) >= 0).any()),
        "raw_files": names,
        "preprocessing_atol": PREPROCESSING_ATOL,
        "reference": "unmerged PyTorch",
        # what an INT8 artifact is compared with on the device (CHECK_TOLERANCES' int8 entries say why)
        "int8_reference": f"{int8.name} (ONNX Runtime, exact Q/DQ) here" if int8 is not None else None,
        "tolerances": {
            key: dataclasses.asdict(fp32 if key == "fp32" and fp32 is not None else tol)
            for key, tol in CHECK_TOLERANCES.items()
        },
    }


def _from_labelled(work: Path, images: AccuracySet, prep: dict[str, Any], n: int):
    """A seeded spread of ``n`` labelled images (a split is ordered by class: its first n are one class), each
    through the bundle's own infer.py preprocessing; with their raw samples, for the raw files."""
    shipped = load_infer_module(work / "infer.py")
    picks = sorted(np.random.default_rng(0).choice(len(images), size=min(n, len(images)), replace=False))
    inputs, labels, raws = [], [], []
    for row, pick in enumerate(picks):
        raw, label = raw_sample(images.dataset, images.indices[int(pick)])
        image = shipped.load_image(raw) if isinstance(raw, (str, Path)) else raw.convert("RGB")
        inputs.append(np.asarray(shipped.preprocess_image(image, prep), dtype=np.float32))
        labels.append(int(label))
        raws.append((row, raw))
    return np.ascontiguousarray(np.stack(inputs)), labels, raws, f"{len(picks)} of {images.source}"


def _size(raw) -> int:
    if isinstance(raw, (str, Path)):
        return Path(raw).stat().st_size
    buffer = io.BytesIO()
    raw.save(buffer, format="PNG")
    return buffer.tell()


def _smallest(raws: list[tuple[int, Any]], count: int) -> list[tuple[int, Any]]:
    """Up to ``count`` raw samples, the smallest of each file format first (each format has its own decoder on the
    device), then the smallest others, within RAW_BYTES_BUDGET (at least one when there is any)."""
    by_size = sorted(raws, key=lambda item: _size(item[1]))
    formats: dict[str, tuple[int, Any]] = {}
    for item in by_size:
        formats.setdefault(_format(item[1]), item)
    first = {row for row, _ in formats.values()}
    ordered = list(formats.values()) + [item for item in by_size if item[0] not in first]
    chosen: list[Any] = []
    used = 0
    for row, raw in ordered[:count]:
        size = _size(raw)
        if chosen and used + size > RAW_BYTES_BUDGET:
            continue
        chosen.append((row, raw))
        used += size
    return sorted(chosen, key=lambda item: item[0])


def _format(raw) -> str:
    return Path(raw).suffix.lower() if isinstance(raw, (str, Path)) else ".png"


def _copy_raw(raw, directory: Path, k: int) -> str:
    """The raw sample as reference/NN.ext: a file is copied byte for byte (its own format is what the device must
    decode); an in-memory image is saved as PNG, which is lossless."""
    if isinstance(raw, (str, Path)):
        target = directory / f"{k:02d}{Path(raw).suffix.lower()}"
        shutil.copyfile(raw, target)
    else:
        target = directory / f"{k:02d}.png"
        raw.save(target, format="PNG")
    return f"{RAW_DIR}/{target.name}"
