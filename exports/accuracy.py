"""Task accuracy of every artifact, measured through the preprocessing the bundle SHIPS.

Logit parity (``parity.py``) compares tensors after preprocessing, so it cannot see a bundle that preprocesses
differently from training. Here each labelled image goes two ways:

* the training side: ``dataset[i]``, the run's own transform (:mod:`peftx.preprocess`), into the unmerged PyTorch
  model: that is what ``peftx eval`` measures, the reference accuracy;
* the shipped side: the raw file (or in-memory image) through the bundle's own ``infer.py`` (``load_image`` +
  ``preprocess_image``, loaded from the bundle file itself) into every artifact, as on the device.

The two input tensors must agree (``PREPROCESSING_ATOL``), and each artifact's accuracy may drop against the
reference only by its :class:`~peftx.tolerances.AccuracyTolerance`. Both failures fail the bundle, as parity
failures do. Candidates are (runner, tolerance, required) triples, so another precision (INT8) adds itself with
its own tolerance.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from rich.table import Table

from peftx.data import raw_sample
from peftx.errors import ExportError, UsageError
from peftx.tolerances import PREPROCESSING_ATOL, AccuracyTolerance

from .runners import Runner

Candidate = tuple[Runner, AccuracyTolerance, bool]  # (runner, tolerance, required)
_CHUNK = 32  # images per forward pass: bounds memory at any accuracy-set size


@dataclass
class AccuracySet:
    """Labelled images to measure accuracy on: ``dataset`` yields (training-side tensor, label); its raw samples are
    what the shipped preprocessing gets (``peftx.data.raw_sample``)."""

    dataset: Any
    indices: list[int]
    source: str  # what they are, for reports: "test split of ImageFolder /data/pets (500 of 3,669 images)"
    total: int  # images in the split the indices were drawn from

    def __len__(self) -> int:
        return len(self.indices)


def select(dataset: Any, source: str, limit: int | None, seed: int = 0) -> AccuracySet:
    """All of ``dataset`` (``limit`` None or >= its size), else a seeded random ``limit`` of it, in dataset order."""
    total = len(dataset)
    if limit is not None and limit < 1:
        raise UsageError(f"accuracy images: {limit} must be >= 1", "pass a positive count, or skip the measurement")
    if limit is None or limit >= total:
        indices = list(range(total))
    else:
        indices = sorted(int(i) for i in np.random.default_rng(seed).choice(total, size=limit, replace=False))
    shown = f"{len(indices):,} of {total:,} images" if len(indices) < total else f"{total:,} images"
    return AccuracySet(dataset, indices, f"{source} ({shown})", total)


@dataclass
class AccuracyResult:
    candidate: str
    tolerance: AccuracyTolerance
    required: bool
    n: int
    accuracy: float
    reference_accuracy: float
    drop: float  # reference_accuracy - accuracy (negative: the artifact did better)
    agreement: float  # top-1 agreement with the reference on these images
    bound: float  # the largest drop the tolerance allows on n images
    passed: bool
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "tolerance"}, "tolerance": asdict(self.tolerance)}


@dataclass
class PreprocessingCheck:
    """The shipped preprocessing against the training-side transform, on the same raw images."""

    images: int
    max_abs: float
    bound: float
    passed: bool
    shipped: str  # which code produced the shipped side
    contract: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AccuracyReport:
    source: str
    images: int
    total: int
    reference: str
    reference_accuracy: float
    preprocessing: PreprocessingCheck
    results: list[AccuracyResult]
    notes: list[str] = field(default_factory=list)
    # the first ``keep`` images as shipped, with the reference's logits and the labels (for a reference set); not JSON
    kept: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return self.preprocessing.passed and all(r.passed for r in self.results if r.required)

    def failures(self) -> list[str]:
        out = (
            []
            if self.preprocessing.passed
            else [
                f"the shipped preprocessing differs from the training transform "
                f"(max |Δ| {self.preprocessing.max_abs:.3g} > {self.preprocessing.bound:.1g})"
            ]
        )
        return out + [f"{r.candidate}: {f}" for r in self.results if r.required for f in r.failures]

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "source": self.source,
            "images": self.images,
            "total": self.total,
            "reference": self.reference,
            "reference_accuracy": self.reference_accuracy,
            "preprocessing": self.preprocessing.to_json(),
            "results": [r.to_json() for r in self.results],
            "notes": self.notes,
        }

    def summary(self) -> dict[str, Any]:
        """What metadata.json keeps: the accuracies, drops and verdicts (the details are in parity.json)."""
        return {
            "measured": True,
            "passed": self.passed,
            "source": self.source,
            "images": self.images,
            "reference_accuracy": self.reference_accuracy,
            "preprocessing_max_abs": self.preprocessing.max_abs,
            "artifacts": {
                r.candidate: {
                    "accuracy": r.accuracy,
                    "drop": r.drop,
                    "agreement": r.agreement,
                    "passed": r.passed,
                    "required": r.required,
                }
                for r in self.results
            },
        }

    def table(self) -> Table:
        return accuracy_table(self)


def load_infer_module(path: str | Path) -> ModuleType:
    """The bundle's own infer.py as a module (not the template peftx ships): its preprocessing is what a user runs."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"_peftx_shipped_infer_{uuid.uuid4().hex[:8]}", path)
    if spec is None or spec.loader is None:
        raise ExportError(f"cannot load {path}", "re-create the bundle")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of the shipped file is a broken bundle
        raise ExportError(f"{path.name} does not load: {exc}", "re-create the bundle") from exc
    if not callable(getattr(module, "preprocess_image", None)) or not callable(getattr(module, "load_image", None)):
        raise ExportError(f"{path.name} has no preprocess_image / load_image", "re-create the bundle with this peftx")
    return module


def measure_accuracy(
    reference: Runner,
    candidates: Sequence[Candidate],
    images: AccuracySet,
    preprocessing: Mapping[str, Any],
    infer_path: str | Path,
    *,
    batch: tuple[int, int] = (1, 32),
    keep: int = 0,
    progress: Callable[[str], None] | None = None,
) -> AccuracyReport:
    """Accuracy of ``reference`` (training-side inputs) and of every candidate (shipped-preprocessing inputs).

    ``preprocessing`` is the bundle's recorded contract (metadata.json's), ``infer_path`` the bundle's infer.py,
    ``batch`` the (min, max) batch the candidates take (a TensorRT profile); ``keep`` keeps the first images'
    shipped inputs and reference logits in ``report.kept``.
    """
    say = progress or (lambda _m: None)
    if not len(images):
        raise UsageError("the accuracy set is empty", "pass labelled images")
    shipped = load_infer_module(infer_path)
    prep = dict(preprocessing)
    low, high = batch
    size = min(max(_CHUNK, low), high)
    labels: list[np.ndarray] = []
    ref_pred: list[np.ndarray] = []
    preds: dict[str, list[np.ndarray]] = {runner.name: [] for runner, _, _ in candidates}
    kept: dict[str, list[np.ndarray]] = {"inputs": [], "reference_logits": [], "labels": []}
    max_abs = 0.0
    say(f"measuring accuracy on {images.source}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(reference)
        for runner, _, _ in candidates:
            stack.enter_context(runner)
        for start in range(0, len(images), size):
            chunk = images.indices[start : start + size]
            ours, theirs, ys = [], [], []
            for index in chunk:
                x, y = images.dataset[index]
                raw, _ = raw_sample(images.dataset, index)
                image = shipped.load_image(raw) if isinstance(raw, (str, Path)) else raw.convert("RGB")
                ours.append(np.asarray(x, dtype=np.float32))
                theirs.append(np.asarray(shipped.preprocess_image(image, prep), dtype=np.float32))
                ys.append(int(y))
            ours_b, theirs_b = np.stack(ours), np.stack(theirs)
            if ours_b.shape != theirs_b.shape:
                max_abs = math.inf
            else:
                max_abs = max(max_abs, float(np.abs(ours_b - theirs_b).max(initial=0.0)))
            ref_logits = _run(reference, ours_b, low)
            ref_pred.append(ref_logits.argmax(axis=1))
            labels.append(np.asarray(ys))
            if len(kept["labels"]) * size < keep:
                kept["inputs"].append(theirs_b)
                kept["reference_logits"].append(ref_logits)
                kept["labels"].append(np.asarray(ys))
            if ours_b.shape == theirs_b.shape:
                for runner, _, _ in candidates:
                    preds[runner.name].append(_run(runner, theirs_b, low).argmax(axis=1))
    y_true, y_ref = np.concatenate(labels), np.concatenate(ref_pred)
    ref_acc = float((y_ref == y_true).mean())
    check = PreprocessingCheck(
        len(y_true),
        max_abs,
        PREPROCESSING_ATOL,
        max_abs <= PREPROCESSING_ATOL,
        f"{Path(infer_path).name}: load_image + preprocess_image",
        prep,
    )
    results = [
        _result(runner.name, tol, required, preds[runner.name], y_true, y_ref, ref_acc)
        for runner, tol, required in candidates
    ]
    report = AccuracyReport(
        images.source, len(y_true), images.total, getattr(reference, "name", "reference"), ref_acc, check, results
    )
    if keep:
        report.kept = {k: np.concatenate(v)[:keep] for k, v in kept.items() if v}
    return report


def _run(runner: Runner, batch: np.ndarray, low: int) -> np.ndarray:
    """Outputs for ``batch``, padded up to the runner's smallest batch (a TensorRT profile's min) and trimmed."""
    n = len(batch)
    if n < low:
        batch = np.concatenate([batch, np.repeat(batch[-1:], low - n, axis=0)])
    return np.asarray(runner.infer(np.ascontiguousarray(batch)), dtype=np.float32)[:n]


def _result(
    name: str,
    tol: AccuracyTolerance,
    required: bool,
    chunks: list[np.ndarray],
    y_true: np.ndarray,
    y_ref: np.ndarray,
    ref_acc: float,
) -> AccuracyResult:
    n = len(y_true)
    if not chunks:  # the shipped inputs had another shape: nothing could run
        return AccuracyResult(
            name,
            tol,
            required,
            n,
            math.nan,
            ref_acc,
            math.nan,
            math.nan,
            tol.bound(n),
            False,
            ["not run: the shipped preprocessing produced inputs of another shape"],
        )
    pred = np.concatenate(chunks)
    acc, agreement = float((pred == y_true).mean()), float((pred == y_ref).mean())
    drop, bound = ref_acc - acc, tol.bound(n)
    failures = (
        []
        if drop <= bound + 1e-12
        else [
            f"accuracy {100 * acc:.2f} % is {100 * drop:.2f} points below the unmerged model's {100 * ref_acc:.2f} % "
            f"(allowed {100 * bound:.2f} on {n} images, {tol.name})"
        ]
    )
    return AccuracyResult(name, tol, required, n, acc, ref_acc, drop, agreement, bound, not failures, failures)


def result_for(
    name: str,
    tol: AccuracyTolerance,
    required: bool,
    pred: np.ndarray,
    labels: np.ndarray,
    reference_pred: np.ndarray,
    reference_accuracy: float,
) -> AccuracyResult:
    """The gate's verdict for predictions ``pred`` on images already measured (``AccuracyReport.kept``): how the
    INT8 fallback re-checks a graph without running the reference and the preprocessing again."""
    return _result(
        name, tol, required, [np.asarray(pred)], np.asarray(labels), np.asarray(reference_pred), reference_accuracy
    )


def accuracy_table(report: AccuracyReport, *, title: str | None = None) -> Table:
    """The reference and one row per artifact, the preprocessing check as the caption; fits 80 columns."""
    pre = report.preprocessing
    verdict = "[green]pass[/]" if pre.passed else "[red]FAIL[/]"
    table = Table(
        title=title or f"Accuracy on {report.source}",
        caption=f"unmerged: the run's transform; artifacts: the bundle's infer.py on the raw images; "
        f"their inputs differ by max |Δ| {pre.max_abs:.1e} (bound {pre.bound:.0e}): {verdict}",
    )
    for column in ("model", "accuracy", "drop", "agree", "allowed", "verdict"):
        table.add_column(column, justify="left" if column in ("model", "verdict") else "right")
    table.add_row(report.reference, f"{100 * report.reference_accuracy:.2f} %", "", "", "", "reference")
    for r in report.results:
        state = "[green]pass[/]" if r.passed else "[red]FAIL[/]" if r.required else "[yellow]fail (advisory)[/]"
        table.add_row(
            r.candidate,
            f"{100 * r.accuracy:.2f} %",
            f"{100 * r.drop:+.2f}",
            f"{100 * r.agreement:.1f} %",
            f"{100 * r.bound:.2f}",
            state,
        )
    return table
