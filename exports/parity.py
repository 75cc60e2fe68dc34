"""Compare a candidate runner with the reference (unmerged PyTorch) on named input sets (Polygraphy-style).

Reference outputs are computed once (``reference_outputs``) and reused for every candidate. Each comparison reports,
per input set and overall: max/mean/median/p99 absolute error, max relative error, the smallest per-sample cosine
similarity, top-1 agreement, the tolerance applied, the verdict and ``would_pass_atol`` (the atol that would have
passed, Polygraphy's "what would have passed" printout).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from peftx.tolerances import Tolerance

from .runners import Runner

if TYPE_CHECKING:
    from .accuracy import AccuracyReport

# Elements with |reference| below this fraction of the output's scale are left out of the relative error, where
# |Δ|/|ref| is noise divided by ~0 and says nothing about the model.
_REL_FLOOR = 1e-3


@dataclass
class ErrorStats:
    samples: int
    max_abs: float
    mean_abs: float
    median_abs: float
    p99_abs: float
    max_rel: float  # elementwise |Δ|/|ref| over elements with |ref| >= 1e-3 * ref_max_abs
    ref_max_abs: float  # the output's scale: max |reference|
    min_cosine: float  # worst per-sample cosine similarity
    top1_agreement: float
    finite: bool
    bound: float  # the max-abs bound the tolerance gives at this scale
    would_pass_atol: float  # smallest atol (with the tolerance's rel_to_max) that would have passed max_abs
    passed: bool
    failures: list[str] = field(default_factory=list)


@dataclass
class ParityResult:
    candidate: str
    reference: str
    tolerance: Tolerance
    sets: dict[str, ErrorStats]
    overall: ErrorStats
    required: bool = True  # an advisory comparison is reported but does not fail the bundle

    @property
    def passed(self) -> bool:
        return self.overall.passed

    def to_json(self) -> dict:
        return {
            "candidate": self.candidate,
            "reference": self.reference,
            "required": self.required,
            "passed": self.passed,
            "tolerance": asdict(self.tolerance),
            "overall": _clean(asdict(self.overall)),
            "sets": {name: _clean(asdict(stats)) for name, stats in self.sets.items()},
        }


@dataclass
class ParityReport:
    """Every logit comparison and, when labelled images were available, the accuracy gate (``accuracy.py``)."""

    results: list[ParityResult]
    notes: list[str] = field(default_factory=list)
    accuracy: AccuracyReport | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results if r.required) and (self.accuracy is None or self.accuracy.passed)

    @property
    def failed(self) -> list[ParityResult]:
        """The required logit comparisons that failed (accuracy failures: ``failure_lines``)."""
        return [r for r in self.results if r.required and not r.passed]

    def failure_lines(self) -> list[str]:
        """One line per failure, logits and accuracy alike."""
        lines = [f"{r.candidate}: {r.overall.failures[0] if r.overall.failures else 'failed'}" for r in self.failed]
        return lines + (self.accuracy.failures() if self.accuracy is not None else [])

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "results": [r.to_json() for r in self.results],
            "notes": self.notes,
            "accuracy": self.accuracy.to_json() if self.accuracy is not None else None,
        }

    def table(self) -> Table:
        return parity_table(self.results)


def make_input_sets(
    images: np.ndarray, batch_sizes: Sequence[int], *, random_batch: int = 3, seed: int = 0
) -> dict[str, np.ndarray]:
    """Named input sets: ``real_b{n}`` (real images, cycled when fewer than n) and ``random_b{random_batch}``.

    Real images are what matters (errors on noise can hide or exaggerate); the random set probes inputs off the data.
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    sets = {f"real_b{n}": np.resize(images, (n, *images.shape[1:])) for n in sorted(set(batch_sizes))}
    if random_batch:
        noise = np.random.default_rng(seed).standard_normal((random_batch, *images.shape[1:]))
        sets[f"random_b{random_batch}"] = noise.astype(np.float32)
    return sets


def reference_outputs(runner: Runner, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the reference once per input set; pass the result to ``compare`` for every candidate."""
    with runner:
        return {name: runner.infer(batch) for name, batch in inputs.items()}


def float64_outputs(module: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """``module`` (a torch.nn.Module in eval mode) evaluated in float64 on the CPU on every input set: the reference
    the FP32 outputs' rounding noise is measured against (:func:`fp32_noise`). A copy is converted, so ``module``
    is untouched; None when the model cannot run in float64 (an op without a float64 kernel)."""
    import copy

    import torch

    try:
        model = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
        with torch.inference_mode():
            out = {name: model(torch.from_numpy(np.asarray(x, dtype=np.float64))) for name, x in inputs.items()}
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    if any(v.dtype != torch.float64 for v in out.values()):
        return None  # something cast back to float32: not a float64 evaluation
    return {name: v.numpy() for name, v in out.items()}


def fp32_noise(expected: Mapping[str, np.ndarray], expected64: Mapping[str, np.ndarray]) -> float:
    """Max |Δ| between FP32 outputs and the same model's float64 outputs over every input set: how far this
    processor's FP32 arithmetic moves this model's logits (the measure ``tolerances.NoiseBound`` scales)."""
    return max(float(np.abs(expected[k].astype(np.float64) - expected64[k]).max(initial=0.0)) for k in expected)


def compare(
    reference: Runner | Mapping[str, np.ndarray],
    candidate: Runner,
    inputs: Mapping[str, np.ndarray],
    tolerance: Tolerance,
    *,
    reference_name: str | None = None,
    required: bool = True,
) -> ParityResult:
    """Compare ``candidate`` with ``reference`` (a runner, or outputs from ``reference_outputs``) on every input set."""
    if isinstance(reference, Mapping):
        expected, ref_name = dict(reference), reference_name or "reference"
    else:
        expected, ref_name = reference_outputs(reference, inputs), reference_name or reference.name
    with candidate:
        actual = {name: candidate.infer(batch) for name, batch in inputs.items()}
    sets = {name: error_stats(expected[name], actual[name], tolerance) for name in inputs}
    return ParityResult(
        candidate.name, ref_name, tolerance, sets, _overall(expected, actual, sets, tolerance), required
    )


def error_stats(expected: np.ndarray, actual: np.ndarray, tolerance: Tolerance) -> ErrorStats:
    """Errors of ``actual`` against ``expected`` (leading axis = samples) and the verdict under ``tolerance``."""
    if expected.shape != actual.shape:
        return _unmeasurable(len(expected), f"output shape {actual.shape} != reference {expected.shape}")
    ref, out = expected.astype(np.float64), actual.astype(np.float64)
    finite = bool(np.isfinite(out).all())
    diff = np.abs(out - ref).ravel()
    ref_max = float(np.abs(ref).max(initial=0.0))
    significant = np.abs(ref).ravel() >= _REL_FLOOR * ref_max
    max_rel = float((diff[significant] / np.abs(ref).ravel()[significant]).max(initial=0.0))
    max_abs = float(diff.max(initial=0.0))
    stats = ErrorStats(
        samples=len(expected),
        max_abs=max_abs,
        mean_abs=float(diff.mean()),
        median_abs=float(np.median(diff)),
        p99_abs=float(np.quantile(diff, 0.99)),
        max_rel=max_rel,
        ref_max_abs=ref_max,
        min_cosine=_min_cosine(ref, out),
        top1_agreement=_top1(ref, out),
        finite=finite,
        bound=tolerance.bound(ref_max),
        would_pass_atol=max(0.0, max_abs - tolerance.rel_to_max * ref_max),
        passed=False,
    )
    stats.failures = _failures(stats, tolerance)
    stats.passed = not stats.failures
    return stats


def _failures(s: ErrorStats, tol: Tolerance) -> list[str]:
    failures = []
    if not s.finite:
        failures.append("non-finite outputs (NaN/Inf)")
    if not s.max_abs <= s.bound:  # also catches NaN
        failures.append(f"max |Δ| {s.max_abs:.3g} > bound {s.bound:.3g}")
    if not s.top1_agreement >= tol.min_top1:
        failures.append(f"top-1 agreement {s.top1_agreement:.3f} < {tol.min_top1}")
    if not s.min_cosine >= tol.min_cosine:
        failures.append(f"cosine {s.min_cosine:.6f} < {tol.min_cosine}")
    return failures


def _overall(
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    sets: Mapping[str, ErrorStats],
    tolerance: Tolerance,
) -> ErrorStats:
    """Statistics over all sets together; it passes only if every set passed (each set is bounded at its own scale)."""
    if len({a.shape[1:] for a in (*expected.values(), *actual.values())}) == 1:
        stats = error_stats(np.concatenate(list(expected.values())), np.concatenate(list(actual.values())), tolerance)
    else:
        stats = _unmeasurable(sum(len(e) for e in expected.values()), "")
    stats.would_pass_atol = max(s.would_pass_atol for s in sets.values())
    stats.failures = [f"{name}: {f}" for name, s in sets.items() for f in s.failures]
    stats.passed = all(s.passed for s in sets.values())
    return stats


def _unmeasurable(samples: int, failure: str) -> ErrorStats:
    nan = math.nan
    return ErrorStats(samples, nan, nan, nan, nan, nan, nan, nan, 0.0, False, nan, nan, False, [failure])


def _min_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Worst per-sample cosine similarity (two all-zero samples count as identical; NaN counts as 0)."""
    a, b = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(axis=1) / norms
    cos = np.where(norms == 0, np.where((a == b).all(axis=1), 1.0, 0.0), cos)
    return float(np.nan_to_num(cos, nan=0.0).min(initial=1.0))


def _top1(ref: np.ndarray, out: np.ndarray) -> float:
    a, b = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    return float((a.argmax(axis=1) == np.nan_to_num(b, nan=-np.inf).argmax(axis=1)).mean()) if len(a) else 1.0


def _clean(d: dict) -> dict:
    """JSON has no NaN/Inf: write them as strings."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def parity_table(results: Sequence[ParityResult], *, title: str = "Parity vs the unmerged PyTorch model") -> Table:
    """One row per candidate: its worst input set (what the verdict rests on). It fits 80 columns; the per-input-set
    figures (mean and p99 |Δ|, max rel, the atol that would pass) are in parity.json / ``--json``."""
    table = Table(title=title, caption="per input set: parity.json (or --json)")
    table.add_column("candidate", justify="left", ratio=1, overflow="fold")
    for column in ("max |Δ|", "bound", "cosine", "top-1"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("verdict", justify="left", no_wrap=True)
    for result in results:
        s = result.overall
        verdict = "[green]pass[/]" if s.passed else "[red]FAIL[/]" if result.required else "[yellow]fail (advisory)[/]"
        name = result.candidate
        worst = failing_set(result)
        if worst is not None:  # the figures of the set that failed (the overall max |Δ| can sit below its bound)
            set_name, s = worst
            name += f"\n[dim]└ {set_name}: {_how_much(s)}[/]"
        table.add_row(
            name,
            f"{s.max_abs:.1e}",
            f"{s.bound:.1e}",
            f"{s.min_cosine:.5f}",
            f"{100 * s.top1_agreement:.1f} %",
            verdict,
        )
    return table


def failing_set(result: ParityResult) -> tuple[str, ErrorStats] | None:
    """The input set a failed comparison fails worst on (by max |Δ| against its own bound), or None if it passed."""
    failing = [(name, stats) for name, stats in result.sets.items() if not stats.passed]
    if not failing:
        return None

    def excess(item: tuple[str, ErrorStats]) -> float:
        stats = item[1]
        if not (math.isfinite(stats.max_abs) and stats.bound > 0):
            return math.inf
        return stats.max_abs / stats.bound

    return max(failing, key=excess)


def _how_much(s: ErrorStats) -> str:
    """'|Δ| 2.3x its bound' for an error over its bound, else the set's first failure."""
    if math.isfinite(s.max_abs) and s.bound > 0 and s.max_abs > s.bound:
        return f"|Δ| {s.max_abs / s.bound:.1f}x its bound"
    return s.failures[0] if s.failures else "failed"
