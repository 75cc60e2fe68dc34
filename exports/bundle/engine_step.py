"""Step: model.engine (+ model.engine.json) when TensorRT is usable here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runners import TensorRTRunner
from ..tensorrt import (
    build_engine,
)
from .format import ENGINE_FILE, FP16_FILE, INT8_FILE
from .request import BundleRequest, Progress


def _tensorrt_step(
    work: Path, onnx_path: Path, opt: BundleRequest, fp32_nodes: list[str], timings: dict[str, float], say: Progress
) -> tuple[dict[str, Any], TensorRTRunner | None]:
    """Build model.engine (+ model.engine.json) when TensorRT is in use and return its runner; else record why not."""
    info: dict[str, Any] = {"mode": opt.tensorrt, "used": opt.use_trt, "message": opt.trt_message, "build": None}
    if not opt.use_trt:
        return info, None
    say(f"building the TensorRT {opt.precision} engine")
    build = build_engine(
        onnx_path,
        work / ENGINE_FILE,
        batch=opt.batch,
        precision=opt.precision,
        timing_cache_path=opt.timing_cache,
        fp16_onnx_path=work / FP16_FILE,
        int8_onnx_path=work / INT8_FILE,
        fp32_layers=fp32_nodes,
        target=opt.target.name,
    )
    info["build"] = build.to_json()
    timings["tensorrt_build_s"] = build.seconds
    return info, TensorRTRunner(build.path, name=f"tensorrt {opt.precision}")
