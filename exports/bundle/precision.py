"""The bundle's precision: one type, and what each precision is checked against.

Adding a precision: extend ``Precision``, ``ENGINE_PARITY`` and ``ACCURACY`` here (and the target's build flags in
``targets.py``).
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
