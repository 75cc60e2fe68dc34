"""The one table of a bundle's checked artifacts: per artifact its file, its runners, its parity and accuracy
tolerance, and whether each verdict is required or advisory at the bundle's precision. Writing a bundle
(``assemble.py``) and validating one (``validate.py``) both read it; adding an artifact is one row here.

``precision`` below is the precision the bundle was made at (for the engine: the precision it was built at).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime

from peftx.tolerances import FP16, INT8, ONNX_FP32, AccuracyTolerance, Tolerance

from .. import int8 as int8_mod
from ..fp16 import strict_fp16_emulation
from ..runners import OnnxRuntimeRunner, Runner, TensorRTRunner
from .format import ENGINE_FILE, FP16_FILE, INT8_EXACT, INT8_FILE, INT8_FUSED, ONNX_FILE
from .precision import ACCURACY, Precision, accuracy_tolerance, engine_tolerance, quantized


@dataclass(frozen=True)
class Artifact:
    """One checked artifact. ``runners(bundle_dir, scratch, precision)`` opens it (one artifact may be run more than
    one way: FP16 as ONNX Runtime runs it and as strict rounding emulates it)."""

    name: str
    file: str
    runners: Callable[[Path, Path, Precision], list[Runner]]
    parity: Callable[[Precision], Tolerance]  # its logits against the unmerged model
    accuracy: Callable[[Precision], AccuracyTolerance]  # its task accuracy against the unmerged model's
    parity_required: Callable[[Precision], bool]  # False: reported, advisory
    accuracy_required: Callable[[Precision], bool]


def _fp16_runners(onnx_path: Path, fp16_path: Path, scratch: Path) -> list[OnnxRuntimeRunner]:
    """The FP16 ONNX as ONNX Runtime runs it, and the strict rounding emulation (see fp16.py for why both)."""
    emulation = strict_fp16_emulation(onnx_path, fp16_path, scratch / "fp16_emulation.onnx")
    return [
        OnnxRuntimeRunner(fp16_path, name="onnxruntime fp16"),
        OnnxRuntimeRunner(emulation, name="fp16 emulation (strict rounding)"),
    ]


def _int8_runners(path: Path) -> tuple[OnnxRuntimeRunner, OnnxRuntimeRunner]:
    """(exact, fused): model_int8.onnx unoptimised (the Q/DQ arithmetic TensorRT performs, the gate's) and optimised
    (this CPU's fused int8 kernels, infer.py's and bench's)."""
    return (
        OnnxRuntimeRunner(path, name=INT8_EXACT, session_options=int8_mod.exact_session_options(onnxruntime)),
        OnnxRuntimeRunner(path, name=INT8_FUSED),
    )


def _always(precision: Precision) -> bool:
    return True


def _never(precision: Precision) -> bool:
    return False


ONNX = Artifact(
    name="onnx",
    file=ONNX_FILE,
    runners=lambda d, scratch, p: [OnnxRuntimeRunner(d / ONNX_FILE, name="onnxruntime fp32")],
    parity=lambda p: ONNX_FP32,  # replaced by the bound measured from this run's FP32 noise (checks._fp32_bounds)
    accuracy=lambda p: ACCURACY["fp32"],
    parity_required=_always,
    accuracy_required=_always,
)
FP16_ONNX = Artifact(  # required in an fp16 bundle, advisory otherwise
    name="onnx_fp16",
    file=FP16_FILE,
    runners=lambda d, scratch, p: list(_fp16_runners(d / ONNX_FILE, d / FP16_FILE, scratch)),
    parity=lambda p: FP16,
    accuracy=lambda p: ACCURACY["fp16"],
    parity_required=lambda p: p == "fp16",
    accuracy_required=lambda p: p == "fp16",
)
INT8_ONNX = Artifact(  # the exact Q/DQ arithmetic: logits move by design (advisory), gated on task accuracy
    name="onnx_int8",
    file=INT8_FILE,
    runners=lambda d, scratch, p: [_int8_runners(d / INT8_FILE)[0]],
    parity=lambda p: INT8,
    accuracy=lambda p: ACCURACY["int8"],
    parity_required=_never,
    accuracy_required=_always,
)
INT8_FUSED_KERNELS = Artifact(  # this CPU's fused int8 kernels (against the exact arithmetic): advisory throughout
    name="onnx_int8_fused",
    file=INT8_FILE,
    runners=lambda d, scratch, p: [_int8_runners(d / INT8_FILE)[1]],
    parity=lambda p: INT8,
    accuracy=lambda p: ACCURACY["int8"],
    parity_required=_never,
    accuracy_required=_never,
)
ENGINE = Artifact(  # an INT8 engine's logits are advisory, its accuracy required
    name="engine",
    file=ENGINE_FILE,
    runners=lambda d, scratch, p: [TensorRTRunner(d / ENGINE_FILE, name=f"tensorrt {p}")],
    parity=engine_tolerance,
    accuracy=accuracy_tolerance,
    parity_required=lambda p: not quantized(p),
    accuracy_required=_always,
)
ARTIFACTS: tuple[Artifact, ...] = (ONNX, FP16_ONNX, INT8_ONNX, INT8_FUSED_KERNELS, ENGINE)


def accuracy_candidate(
    artifact: Artifact, runner: Runner, precision: Precision
) -> tuple[Runner, AccuracyTolerance, bool]:
    """``runner`` (one of ``artifact``'s) as the accuracy gate takes it: (runner, tolerance, required)."""
    return runner, artifact.accuracy(precision), artifact.accuracy_required(precision)
