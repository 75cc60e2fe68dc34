"""Step: model_fp16.onnx (the target's FP32 nodes kept FP32) and its runners."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..fp16 import convert_to_fp16
from ..runners import OnnxRuntimeRunner
from .artifacts import _fp16_runners
from .format import FP16_FILE
from .request import FP16_CALIBRATION_IMAGES, BundleRequest, Progress


def _fp16_step(
    work: Path,
    onnx_path: Path,
    images: np.ndarray,
    opt: BundleRequest,
    fp32_nodes: list[str],
    scratch: Path,
    timings: dict[str, float],
    say: Progress,
) -> tuple[dict, list[OnnxRuntimeRunner]]:
    """Write model_fp16.onnx (the target's FP32 nodes kept FP32); return its runners (ORT run, strict emulation in
    ``scratch``) for the parity and accuracy checks."""
    say("converting to FP16")
    started = time.perf_counter()
    fp16 = convert_to_fp16(
        onnx_path, work / FP16_FILE, calibration=images[:FP16_CALIBRATION_IMAGES], keep_fp32_nodes=fp32_nodes
    )
    timings["fp16_s"] = time.perf_counter() - started
    return fp16.to_json(), _fp16_runners(onnx_path, fp16.path, scratch)
