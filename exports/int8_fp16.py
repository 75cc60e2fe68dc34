"""The INT8 graph for strongly typed TensorRT: its float parts in FP16, where peftx's FP16 rules keep them safe.

TensorRT 11 (and 10.x with ``--stronglyTyped``) builds every tensor in the type the ONNX says. The Q/DQ graph
``int8.quantize`` writes keeps everything between the quantized GEMMs (LayerNorm, Softmax, GELU, residual Adds,
reshapes) in FP32, which a weakly typed build (``--int8 --fp16``) was free to run in FP16: built strongly typed,
that INT8 engine is FP32 everywhere but the GEMMs, and likely slower than the FP16 engine. For strongly typed
targets the float parts are therefore converted to FP16 by the same rules as model_fp16.onnx (``fp16.py``:
``convert_to_fp16`` with its op block list ``FP32_OPS`` — normalisations, Softmax, Exp, Pow/Sqrt, reductions stay
FP32 —, the target's FP32 nodes, and every node that reads or writes a value above ``FP16_SAFE_MAX`` on real
calibration images).

The Q/DQ scales become FP16 too, so that each DequantizeLinear hands its GEMM FP16 directly (a Cast between a
DequantizeLinear and its GEMM would stand in the way of TensorRT's Q/DQ fusion). FP16 scales are
QuantizeLinear/DequantizeLinear-19: the graph is raised to opset ``FP16_QDQ_OPSET`` with onnx's version converter,
within the target's parser ceiling (a target whose ceiling is lower is refused). The result is checked like every
INT8 graph: ONNX Runtime runs it for the parity check and the accuracy gate, and ``int8.graph_problems`` holds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from peftx.errors import ExportError

from . import onnx_io
from .fp16 import convert_to_fp16
from .targets import TargetProfile

FP16_QDQ_OPSET = 19  # QuantizeLinear/DequantizeLinear take FP16 scales (and so give FP16 outputs) from opset 19
FLOAT_PARTS_PROP = "peftx_int8_float_parts"  # ONNX metadata_props key: "fp16" once converted


def strongly_typed(target: TargetProfile) -> bool:
    """Whether ``target``'s TensorRT builds every network strongly typed: no precision flags at all (TensorRT 11)."""
    return not target.int8.trtexec_flags and not target.trtexec.fp16


def half_float_parts(
    path: str | Path,
    target: TargetProfile,
    *,
    calibration: np.ndarray | None = None,
    keep_fp32_nodes: Sequence[str] = (),
) -> dict[str, Any]:
    """Rewrite the Q/DQ graph at ``path`` in place with its float parts (and Q/DQ scales) in FP16; return what was
    done (opset before/after, the nodes kept FP32) for metadata.json."""
    path = Path(path)
    model = onnx_io.load(path)
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(FLOAT_PARTS_PROP) == "fp16":
        return json.loads(props.get(f"{FLOAT_PARTS_PROP}_info", "{}"))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if target.opset_max < FP16_QDQ_OPSET:
        raise ExportError(
            f"FP16 Q/DQ scales need opset {FP16_QDQ_OPSET}, {target.name}'s parser stops at {target.opset_max}",
            "strongly typed INT8 is for TensorRT 11 (--target trt11)",
        )
    raised = path.with_name(f".{path.stem}.opset{FP16_QDQ_OPSET}.onnx")
    try:
        if opset < FP16_QDQ_OPSET:
            try:
                model = onnx.version_converter.convert_version(model, FP16_QDQ_OPSET)
            except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors/ValidationErrors
                raise ExportError(
                    f"raising {path.name} from opset {opset} to {FP16_QDQ_OPSET} failed: {type(exc).__name__}: {exc}",
                    "export with --target trt10 (weakly typed INT8: --int8 --fp16) and report the model",
                ) from exc
        onnx_io.save(model, raised)
        result = convert_to_fp16(raised, path, calibration=calibration, keep_fp32_nodes=keep_fp32_nodes)
    finally:
        onnx_io.remove(raised)
    info = {
        "float_parts": "fp16",
        "why": f"{target.name} builds strongly typed: the ONNX types are the engine's types",
        "opset_from": opset,
        "opset": FP16_QDQ_OPSET if opset < FP16_QDQ_OPSET else opset,
        "kept_fp32_ops": result.blocked_ops,
        "kept_fp32_nodes": result.blocked_nodes,
        "calibration_max_abs": result.calibration_max_abs,
    }
    out = onnx_io.load(path, weights=False)  # metadata only: the weights stay in their file, if they have one
    del out.metadata_props[:]
    onnx.helper.set_model_props(
        out, {**props, FLOAT_PARTS_PROP: "fp16", f"{FLOAT_PARTS_PROP}_info": json.dumps(info)}
    )  # not fp16.py's precision "fp16": this is still the INT8 graph
    onnx_io.save(out, path)
    return info


def float_parts(path: str | Path) -> str:
    """ "fp16" when ``half_float_parts`` converted the graph at ``path``, else "fp32"."""
    model = onnx_io.load(path, weights=False)
    return next((p.value for p in model.metadata_props if p.key == FLOAT_PARTS_PROP), "fp32")
