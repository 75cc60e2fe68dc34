"""Parity and accuracy checking of the bundle's artifacts: the comparator bound to the reference outputs, the FP32
noise bounds, the INT8 rows, readiness problems as errors or warnings (what is checked, how, and whether it
counts: ``artifacts.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftx.errors import ExportError, ParityError
from peftx.tolerances import (
    MERGE_FP32,
    MERGE_FP32_MEASURED,
    ONNX_FP32,
    ONNX_FP32_MEASURED,
    Tolerance,
)

from .. import int8 as int8_mod
from ..parity import (
    ParityReport,
    ParityResult,
    compare,
    float64_outputs,
    fp32_noise,
)
from ..runners import Runner
from ..targets import TargetProfile
from .artifacts import INT8_FUSED_KERNELS, INT8_ONNX, _int8_runners
from .format import PARITY_FILE, _first_problems
from .request import Progress


def _checker(
    expected: dict[str, np.ndarray],
    inputs: dict[str, np.ndarray],
    say: Progress,
    measured: Mapping[Tolerance, Tolerance] | None = None,
):
    """compare() bound to the cached reference outputs and input sets; ``measured`` replaces a constant tolerance by
    the one derived from this run's FP32 noise (``_fp32_bounds``)."""

    def check(runner, tolerance, *, required: bool = True, against: Runner | None = None) -> ParityResult:
        tolerance = (measured or {}).get(tolerance, tolerance)
        say(f"checking {runner.name}")
        if against is not None:  # another artifact as the reference (INT8's fused kernels vs its exact arithmetic)
            return compare(against, runner, inputs, tolerance, reference_name=against.name, required=required)
        return compare(
            expected, runner, inputs, tolerance, reference_name="reference (unmerged PyTorch)", required=required
        )

    return check


def _fp32_bounds(
    reference: torch.nn.Module, inputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], say: Progress
) -> tuple[Tolerance, Tolerance, str]:
    """(merged PyTorch's, ONNX Runtime FP32's tolerance, the report's note) from the rounding noise measured here: the
    unmerged model in float64 on the same inputs is the reference its FP32 outputs are measured against
    (``tolerances.NoiseBound``). A model that cannot run in float64 keeps the constant bounds, and the note says so."""
    say("measuring FP32 rounding noise (the unmerged model in float64)")
    expected64 = float64_outputs(reference, inputs)
    if expected64 is None:
        return MERGE_FP32, ONNX_FP32, "FP32 noise not measured (the model does not run in float64): constant bounds"
    noise = fp32_noise(expected, expected64)
    scale = max(float(np.abs(v).max(initial=0.0)) for v in expected64.values())
    merge_tol, onnx_tol = MERGE_FP32_MEASURED.tolerance(noise), ONNX_FP32_MEASURED.tolerance(noise)
    return (
        merge_tol,
        onnx_tol,
        f"FP32 rounding noise of the unmerged model here (FP32 vs its float64 evaluation, same inputs): max |Δ| "
        f"{noise:.3g} at logit scale {scale:.3g}; merged PyTorch bound {merge_tol.bound(scale):.3g} "
        f"({MERGE_FP32_MEASURED.factor:g} x noise + {merge_tol.rel_to_max:g} x scale), ONNX Runtime FP32 bound "
        f"{onnx_tol.bound(scale):.3g}",
    )


def _int8_parity(path: Path, check) -> tuple[list[ParityResult], dict[str, Any]]:
    """The INT8 graph's logit rows (both advisory): the exact arithmetic against the unmerged model, and this CPU's
    fused kernels against the exact arithmetic (``_int8_kernels``); and what metadata.json records of the latter."""
    row, facts = _int8_kernels(path, check)
    exact = INT8_ONNX
    return [check(_int8_runners(path)[0], exact.parity("int8"), required=exact.parity_required("int8")), row], facts


def _int8_kernels(path: Path, check) -> tuple[ParityResult, dict[str, Any]]:
    """This CPU's fused int8 kernels against the exact Q/DQ arithmetic at the INT8 bound (advisory), and the facts
    metadata.json's ``int8.cpu_kernels`` records: the CPU, what its int8 products accumulate in, the figures, and
    the report's note when they disagree."""
    exact, fused = _int8_runners(path)
    rule = INT8_FUSED_KERNELS
    kernels = check(fused, rule.parity("int8"), required=rule.parity_required("int8"), against=exact)
    facts = int8_mod.cpu_int8_kernels()
    s = kernels.overall
    return kernels, {
        **facts,
        "agree": kernels.passed,
        "max_abs": s.max_abs,
        "bound": s.bound,
        "top1_agreement": s.top1_agreement,
        "note": "" if kernels.passed else int8_mod.fused_kernels_note(s.max_abs, s.bound, facts),
    }


def _handle_readiness(problems: list[str], tensorrt: str, warnings: list[str], target: TargetProfile) -> None:
    """Readiness problems are an ExportError, or warnings when TensorRT is off (build_engine.sh then refuses)."""
    if not problems:
        return
    name = target.requested or target.name
    if tensorrt == "off":
        warnings.extend(f"TensorRT readiness ({name}): {p}" for p in problems)
        return
    raise ExportError(
        f"the ONNX graph is not TensorRT-ready for {name}: {_first_problems(problems)}",
        "choose another --target (see `peftx targets`), pass --tensorrt off for an ONNX-only bundle, "
        "or change the model",
    )


def _parity_error(report: ParityReport, where: Path) -> ParityError:
    return ParityError(
        f"parity failed for {'; '.join(report.failure_lines())}",
        f"inspect {where / PARITY_FILE}; the bundle is marked failed",
    )
