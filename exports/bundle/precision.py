"""The bundle's precision: one type, what each precision is checked against, and which precisions are quantized.

Adding a precision: extend ``Precision``, ``ENGINE_PARITY`` and ``ACCURACY`` here, ``QUANTIZED`` if it is made by
calibration (and the target's build flags in ``targets.py``). Code elsewhere compares a precision through
:func:`quantized` or as a ``Precision`` (mypy's strict equality then rejects a misspelt one), never as a bare string.
"""

from __future__ import annotations

from typing import Literal, get_args

from peftx.errors import UsageError
from peftx.tolerances import (
    ACCURACY_FP16,
    ACCURACY_FP32,
    ACCURACY_INT8,
    FP16,
    INT8,
    TENSORRT_FP32,
    AccuracyTolerance,
    Tolerance,
)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

# A TensorRT engine built at a precision, checked against the unmerged model (logits; accuracy).
ENGINE_PARITY: dict[str, Tolerance] = {"fp32": TENSORRT_FP32, "fp16": FP16, "int8": INT8}
ACCURACY: dict[str, AccuracyTolerance] = {"fp32": ACCURACY_FP32, "fp16": ACCURACY_FP16, "int8": ACCURACY_INT8}
# Made by calibrated quantization (a Q/DQ graph, model_int8.onnx): such a bundle needs calibration images and labelled
# images, its logits move by design (advisory) and task accuracy is its gate.
QUANTIZED: frozenset[Precision] = frozenset({"int8"})


def check_precision(precision: str) -> Precision:
    """``precision`` as a Precision, or a UsageError saying which ones exist."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be 'fp32', 'fp16' or 'int8', got {precision!r}", "use precision='fp32'")
    return precision


def engine_tolerance(precision: str) -> Tolerance:
    """The parity tolerance of a TensorRT engine built at ``precision`` (an unknown one: FP32's)."""
    return ENGINE_PARITY.get(precision, TENSORRT_FP32)


def accuracy_tolerance(precision: str) -> AccuracyTolerance:
    """The accuracy tolerance of an artifact computing at ``precision`` (an unknown one: FP32's)."""
    return ACCURACY.get(precision, ACCURACY_FP32)


def quantized(precision: Precision) -> bool:
    """Whether ``precision`` is made by calibrated quantization (``QUANTIZED``)."""
    return precision in QUANTIZED
