"""Step: model.onnx as the target wants it (its opset and LayerNorm form), checked for readiness at once, then
onnxslim (kept only when it passes parity and adds no readiness problem), and the target's FP32 nodes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import onnx
import torch

from peftx.errors import ExportError

from ..layernorm import decomposed_layernorms, fp32_node_names, unsafe_layer_names
from ..onnx_export import export_onnx
from ..runners import OnnxRuntimeRunner
from ..simplify import simplify_onnx
from ..tensorrt_ops import check_tensorrt_readiness
from .artifacts import ONNX
from .checks import _handle_readiness
from .format import ONNX_FILE, _onnx_metadata
from .request import BundleRequest, Progress


def _export_ready_onnx(
    work: Path,
    merged: torch.nn.Module,
    opt: BundleRequest,
    warnings: list[str],
    timings: dict[str, float],
    say: Progress,
) -> Path:
    """Export model.onnx the way the target wants it and check its readiness at once: an unready graph fails before
    the costly checks (the files as shipped are checked again at the end)."""
    onnx_path = work / ONNX_FILE
    say(
        f"exporting ONNX for {opt.target.requested or opt.target.name} (opset {opt.target.export_opset}, "
        f"LayerNorm {opt.target.layernorm})"
    )
    started = time.perf_counter()
    export_onnx(
        merged,
        onnx_path,
        input_size=opt.input_size,
        opset=opt.target.export_opset,
        layernorm=opt.target.layernorm,
        metadata=_onnx_metadata(opt.preprocessing, opt.class_names, opt.provenance, opt.target),
    )
    timings["export_s"] = time.perf_counter() - started
    if opt.tensorrt != "off":  # with TensorRT off, the shipped files' problems become warnings once, at the end
        say("checking TensorRT readiness")
        _handle_readiness(
            check_tensorrt_readiness(onnx_path, target=opt.target).problems, opt.tensorrt, warnings, opt.target
        )
    return onnx_path


def _target_fp32_nodes(onnx_path: Path, opt: BundleRequest) -> list[str]:
    """The shipped graph's nodes the target keeps FP32 in FP16 builds, checked against the model: every LayerNorm
    module must show up as one decomposed subgraph, or the FP32 pinning would miss some."""
    if not opt.target.fp16_fp32_nodes:
        return []

    model = onnx.load(str(onnx_path), load_external_data=False)
    found = len(decomposed_layernorms(model))
    if "layernorm" in opt.target.fp16_fp32_nodes and found != opt.layernorms:
        raise ExportError(
            f"found {found} decomposed LayerNorm subgraphs in {onnx_path.name}, the model has "
            f"{opt.layernorms} LayerNorm modules: the FP32 pinning for {opt.target.name} would miss some",
            "report this model; export for a target with LayerNormalization (--target trt8.6)",
        )
    names = fp32_node_names(model, opt.target.fp16_fp32_nodes)
    unsafe = unsafe_layer_names(names)
    if unsafe:
        raise ExportError(
            f"node name {unsafe[0]!r} cannot be passed to trtexec --layerPrecisions",
            "report this model; its exporter named nodes with ',', ':' or spaces",
        )
    return names


def _simplified_or_original(work: Path, onnx_path: Path, opt: BundleRequest, check, notes: list[str]):
    """Try onnxslim; keep its graph only if it passes ONNX Runtime parity and adds no readiness problem for the
    target (a simplifier that re-fused LayerNorm would break TensorRT 8.5). Returns (simplify info, ORT result)."""
    if not opt.simplify:
        return None, check(OnnxRuntimeRunner(onnx_path, name="onnxruntime fp32"), ONNX.parity(opt.precision))
    slim_path = work / "model.slim.onnx"
    info = simplify_onnx(onnx_path, slim_path)
    if info.applied:
        added = set(check_tensorrt_readiness(slim_path, target=opt.target).problems) - set(
            check_tensorrt_readiness(onnx_path, target=opt.target).problems
        )
        result = check(OnnxRuntimeRunner(slim_path, name="onnxruntime fp32"), ONNX.parity(opt.precision))
        if result.passed and not added:
            os.replace(slim_path, onnx_path)
            return info.to_json(), result
        why = "failed parity" if not result.passed else f"not ready for {opt.target.name}: {sorted(added)[0]}"
        notes.append(f"the onnxslim graph was rejected ({why}); the graph as exported was kept")
        slim_path.unlink()
        info.applied, info.reason = False, f"{info.reason}: rejected, {why}"
    else:
        notes.append(f"simplify skipped: {info.reason}")
    return info.to_json(), check(OnnxRuntimeRunner(onnx_path, name="onnxruntime fp32"), ONNX.parity(opt.precision))
