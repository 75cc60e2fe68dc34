"""ONNX Runtime as the benchmarks set it up: explicit session options, providers, the transformer optimizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn


def model_dims(model: nn.Module) -> tuple[int, int]:
    """(num_heads, hidden_size) for ORT's ViT attention fusion; (0, 0) lets it detect them."""
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) and hasattr(blocks[0], "attn"):
        return int(getattr(blocks[0].attn, "num_heads", 0)), int(getattr(model, "embed_dim", 0))
    return 0, 0


class _Quiet:
    """Silence Python logging (the transformer optimizer logs warnings about producer names) for a block."""

    def __enter__(self) -> None:
        logging.disable(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        logging.disable(logging.NOTSET)


def ort_session_options(threads: int, *, level: str = "all", spinning: bool = True) -> Any:
    """Explicit ONNX Runtime settings: ``threads`` intra-op, 1 inter-op, sequential, graph optimisation ``level``.

    Handed to the library's runner (``peftx.exports.runners.OnnxRuntimeRunner(session_options=...)``): the
    benchmarks time the same runner the bundle's parity checks use, only with the threads pinned."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def ort_providers(device: torch.device) -> tuple[str, ...]:
    """CUDA first when the device is a GPU and this onnxruntime build has the provider."""
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def optimize_for_ort(
    src: str | Path, dst: str | Path, *, model_type: str, num_heads: int = 0, hidden_size: int = 0
) -> dict[str, Any]:
    """Run ``onnxruntime.transformers.optimizer.optimize_model`` (attention/LayerNorm/GELU fusion); returns stats.

    Never raises: a model the optimizer cannot handle gives ``{"ok": False, "reason": ...}``.
    """
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        with _Quiet():
            optimized = optimize_model(str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size)
            fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
            optimized.save_model_to_file(str(dst))
    except Exception as exc:  # noqa: BLE001 - the optimizer is optional; any failure is a reported skip
        return {"ok": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return {"ok": True, "model_type": model_type, "fused_ops": fused}
