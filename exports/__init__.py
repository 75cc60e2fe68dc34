"""Export backends: ONNX, FP16 emulation, TensorRT, deployment targets, bundle, parity checks (``peftx.exports``).

The public names below resolve lazily (PEP 562), so ``import peftx.exports`` stays cheap for a CLI start-up and
TensorRT is only imported by the functions that need it.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "export_onnx": "onnx_export",
    "op_histogram": "onnx_export",
    "param_count": "onnx_export",
    "read_metadata": "onnx_export",
    "simplify_onnx": "simplify",
    "SimplifyResult": "simplify",
    "convert_to_fp16": "fp16",
    "strict_fp16_emulation": "fp16",
    "Fp16Result": "fp16",
    "check_tensorrt_readiness": "tensorrt_ops",
    "ReadinessReport": "tensorrt_ops",
    "supported_ops": "tensorrt_ops",
    "check_target_readiness": "tensorrt_ops",
    "TargetReadiness": "tensorrt_ops",
    "TargetProfile": "targets",
    "resolve_target": "targets",
    "all_targets": "targets",
    "auto_target": "targets",
    "DEFAULT_TARGET": "targets",
    "decomposed_layernorms": "layernorm",
    "doctor_report": "environment",
    "tensorrt_available": "tensorrt",
    "build_engine": "tensorrt",
    "TensorRTRunner": "tensorrt",
    "EngineBuild": "tensorrt",
    "check_engine_for_machine": "tensorrt",
    "resolve_target_here": "tensorrt",
    "TorchRunner": "runners",
    "OnnxRuntimeRunner": "runners",
    "Runner": "runners",
    "compare": "parity",
    "reference_outputs": "parity",
    "make_input_sets": "parity",
    "ParityResult": "parity",
    "ParityReport": "parity",
    "parity_table": "parity",
    "write_bundle": "bundle",
    "read_bundle": "bundle",
    "validate_bundle": "bundle",
    "verify_artifacts": "bundle",
    "BundleReport": "bundle",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
