"""TensorRT readiness of an ONNX graph, checked WITHOUT TensorRT.

What the parser needs and can be verified on a machine without a GPU: every op is one TensorRT's ONNX parser supports
(``data/tensorrt_onnx_ops.json``, transcribed from onnx-tensorrt's docs/operators.md; the JSON names the TensorRT
release), in a dtype it supports for that op, in a default-domain opset it parses, no custom-domain ops (those need
plugins), a few documented structural restrictions, and static non-batch input/output dims (engines are built for one
H x W; only the batch axis gets an optimisation profile). Passing this is necessary, not sufficient: the real test is
building the engine and checking its parity, which ``tensorrt.py`` does where TensorRT exists.
"""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import onnx

_DTYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.INT4: "INT4", onnx.TensorProto.FLOAT4E2M1: "FP4",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.FLOAT8E4M3FNUZ: "FP8",
    onnx.TensorProto.FLOAT8E5M2: "FP8", onnx.TensorProto.FLOAT8E5M2FNUZ: "FP8",
}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_REDUCE_OPS_WITH_AXES_INPUT = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                               "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"}
# Ops whose documented restriction _node_findings checks; the restrictions of other ops present are listed as warnings.
_VERIFIED_RESTRICTIONS = {"LayerNormalization", "Constant", "Squeeze", "Unsqueeze", *_REDUCE_OPS_WITH_AXES_INPUT}


@dataclass
class ReadinessReport:
    ok: bool
    problems: list[str]
    warnings: list[str]
    ops: dict[str, int]
    opset: int
    tensorrt_version: str  # the TensorRT release whose operator list was applied
    source: str
    checked: list[str] = field(default_factory=lambda: ["operators", "dtypes", "opset", "custom domains",
                                                        "restrictions", "static non-batch dims"])

    def to_json(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "warnings": self.warnings, "ops": self.ops,
                "opset": self.opset, "tensorrt_version": self.tensorrt_version, "source": self.source,
                "checked": self.checked, "note": "checked without TensorRT: necessary, not sufficient"}


@functools.cache
def supported_ops() -> dict:
    """The operator matrix (with its source and TensorRT version), loaded once from package data."""
    text = resources.files(__package__).joinpath("data/tensorrt_onnx_ops.json").read_text(encoding="utf-8")
    return json.loads(text)


def check_tensorrt_readiness(onnx_path: str | Path, *, batch_axis: int = 0) -> ReadinessReport:
    """Report whether TensorRT's ONNX parser can take ``onnx_path`` (every problem is named, none short-circuits)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    matrix = supported_ops()
    dtypes = _tensor_dtypes(model)
    problems: list[str] = []
    warnings: list[str] = []
    opset = _default_opset(model)
    if not matrix["opset_min"] <= opset <= matrix["opset_max"]:
        problems.append(f"opset {opset} is outside {matrix['opset_min']}..{matrix['opset_max']} parsed by "
                        f"TensorRT {matrix['tensorrt_version']}")
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in _all_nodes(model.graph) if n.op_type == "Constant" for o in n.output}
    for node in _all_nodes(model.graph):
        node_problems, node_warnings = _node_findings(node, matrix["operators"], dtypes, constants)
        problems += node_problems
        warnings += node_warnings
    problems += _io_problems(model, batch_axis)
    ops = collections.Counter(n.op_type for n in _all_nodes(model.graph))
    for op in sorted(ops):
        restriction = matrix["operators"].get(op, {}).get("restrictions")
        if restriction and op not in _VERIFIED_RESTRICTIONS:
            warnings.append(f"{op}: TensorRT restriction, not verified here: {restriction}")
    if "DOUBLE" in dtypes.values():
        warnings.append("DOUBLE tensors are cast down to FP32 by TensorRT")
    return ReadinessReport(not problems, _dedupe(problems), _dedupe(warnings), dict(sorted(ops.items())), opset,
                           matrix["tensorrt_version"], matrix["source"])


def _node_findings(
    node: onnx.NodeProto, operators: dict, dtypes: dict[str, str], constants: set[str]
) -> tuple[list[str], list[str]]:
    """(problems, warnings) for one node: op support, dtype of its data input, and the checkable restrictions."""
    where = f"{node.op_type} node {node.name or '(unnamed)'}"
    if node.domain not in _DEFAULT_DOMAINS:
        return [f"{where}: custom domain {node.domain!r} needs a TensorRT plugin"], []
    entry = operators.get(node.op_type)
    if entry is None:
        return [f"{where}: op {node.op_type} is not in TensorRT's ONNX operator list"], []
    if not entry["supported"]:
        return [f"{where}: op {node.op_type} is not supported by TensorRT's ONNX parser"], []
    problems, warnings = [], []
    data = node.input[0] if node.input and node.input[0] else (node.output[0] if node.output else "")
    dtype = dtypes.get(data)
    if dtype is not None and dtype not in entry["types"] and not (dtype == "DOUBLE" and "FP32" in entry["types"]):
        problems.append(f"{where}: dtype {dtype} of {data!r} is not one TensorRT supports for {node.op_type} "
                        f"({', '.join(entry['types'])})")
    if node.op_type == "LayerNormalization" and len([o for o in node.output if o]) > 1:
        problems.append(f"{where}: only the first LayerNormalization output is supported (Mean/InvStdDev are used)")
    if node.op_type in _REDUCE_OPS_WITH_AXES_INPUT and len(node.input) > 1 and node.input[1] \
            and node.input[1] not in constants:
        problems.append(f"{where}: reduction axes {node.input[1]!r} must be an initializer")
    if node.op_type in ("Squeeze", "Unsqueeze") and len(node.input) > 1 and node.input[1] not in constants:
        # Computed axes are fine when TensorRT can constant-fold them, which only the parser can tell.
        warnings.append(f"{where}: axes {node.input[1]!r} are computed; TensorRT needs them to fold to a constant")
    if node.op_type == "Constant" and any(a.name in ("sparse_value", "value_string", "value_strings")
                                          for a in node.attribute):
        problems.append(f"{where}: sparse or string constants are not supported")
    return problems, warnings


def _io_problems(model: onnx.ModelProto, batch_axis: int) -> list[str]:
    """Every graph input/output dim other than the batch axis must be a positive static size."""
    initializers = {t.name for t in model.graph.initializer}
    problems = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if value.name in initializers:
                continue
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if axis != batch_axis and not (dim.HasField("dim_value") and dim.dim_value > 0):
                    label = dim.dim_param or "unknown"
                    problems.append(f"{kind} {value.name!r} axis {axis} is dynamic ({label}); only the batch axis "
                                    f"may be: re-export with a static input size")
            elem_type = value.type.tensor_type.elem_type
            if elem_type not in _DTYPE_NAMES:
                problems.append(f"{kind} {value.name!r} has dtype {_dtype_name(elem_type)}, which TensorRT lacks")
    return problems


def _tensor_dtypes(model: onnx.ModelProto) -> dict[str, str]:
    """Element type name of every tensor whose type is known after ONNX shape/type inference."""
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - inference is best effort; unknown types are simply not checked
        graph = model.graph
    infos = [*graph.input, *graph.output, *graph.value_info]
    dtypes = {vi.name: vi.type.tensor_type.elem_type for vi in infos}
    dtypes.update({t.name: t.data_type for t in graph.initializer})
    return {name: _dtype_name(t) for name, t in dtypes.items() if t != onnx.TensorProto.UNDEFINED}


def _dtype_name(elem_type: int) -> str:
    """The operator matrix's name for an ONNX element type (ONNX's own name when TensorRT has none)."""
    return _DTYPE_NAMES.get(elem_type) or onnx.TensorProto.DataType.Name(elem_type)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Nodes of the graph and of every subgraph (If/Loop/Scan bodies are parsed too)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
