"""TensorRT readiness of an ONNX graph for one deployment target, checked WITHOUT TensorRT.

What the parser needs and can be verified on a machine without a GPU, per target (``targets.py``): every op is one
that target's TensorRT release supports (its own onnx-tensorrt docs/operators.md, transcribed as data with its source),
in a dtype it supports for that op (after the casts that release documents, e.g. INT64 -> INT32 on 8.x), in a
default-domain opset inside the target's range, no custom-domain ops (those need plugins), a few documented structural
restrictions, network I/O dtypes the release takes, and static non-batch input/output dims (engines are built for one
H x W; only the batch axis gets an optimisation profile). A bundle is checked as it SHIPS: ``check_target_readiness``
reads model.onnx and model_fp16.onnx as written (after onnxslim) and records their sha256. Passing this is necessary,
not sufficient: the real test is building the engine and checking its parity, which ``tensorrt.py`` does where
TensorRT exists.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from peftx.fsutil import sha256_file

from .targets import TargetProfile, all_targets, resolve_target

_DTYPE_NAMES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.INT4: "INT4",
    onnx.TensorProto.FLOAT4E2M1: "FP4",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.FLOAT8E4M3FNUZ: "FP8",
    onnx.TensorProto.FLOAT8E5M2: "FP8",
    onnx.TensorProto.FLOAT8E5M2FNUZ: "FP8",
}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_REDUCE_OPS_WITH_AXES_INPUT = {
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
}
# Ops whose type column is the type of the tensor they make: ConstantOfShape's input is an INT64 shape by ONNX's
# definition, its output has the `value` attribute's type.
_TYPED_BY_OUTPUT = {"ConstantOfShape"}
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
    target: str = ""  # the profile (trt8.5, ...) whose rules were applied
    file: str = ""
    sha256: str = ""  # of the file as checked: ties the report to what ships
    checked: list[str] = field(
        default_factory=lambda: [
            "operators",
            "dtypes",
            "opset",
            "custom domains",
            "restrictions",
            "I/O dtypes",
            "static non-batch dims",
        ]
    )

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "problems": self.problems,
            "warnings": self.warnings,
            "ops": self.ops,
            "opset": self.opset,
            "tensorrt_version": self.tensorrt_version,
            "source": self.source,
            "target": self.target,
            "file": self.file,
            "sha256": self.sha256,
            "checked": self.checked,
            "note": "checked without TensorRT: necessary, not sufficient",
        }


@dataclass
class TargetReadiness:
    """Readiness of the files a bundle ships, for its target (fails the bundle) and the newer profiles (advice)."""

    target: TargetProfile
    files: dict[str, ReadinessReport]
    newer: dict[str, list[str]] = field(default_factory=dict)  # profile -> problems on the shipped files

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.files.values())

    @property
    def problems(self) -> list[str]:
        return [f"{name}: {p}" for name, report in self.files.items() for p in report.problems]

    @property
    def tensorrt_version(self) -> str:
        return self.target.operators()["tensorrt_version"]

    def to_json(self) -> dict:
        ops = self.target.operators()
        return {
            "ok": self.ok,
            "target": self.target.name,
            "requested": self.target.requested or self.target.name,
            "tensorrt_version": ops["tensorrt_version"],
            "tensorrt_min": self.target.tensorrt_min,
            "op_list": {"source": ops["source"], "ref": ops["ref"], "commit": ops["commit"]},
            "problems": self.problems,
            "files": {name: r.to_json() for name, r in self.files.items()},
            "newer_targets": {
                name: {"ok": not problems, "problems": problems} for name, problems in self.newer.items()
            },
            "note": "what ships, checked without TensorRT: necessary, not sufficient",
        }


def supported_ops(target: TargetProfile | str | None = None) -> dict:
    """The operator matrix of ``target`` (default target when None), with its source and TensorRT version."""
    return _profile(target).operators()


def _profile(target: TargetProfile | str | None) -> TargetProfile:
    return target if isinstance(target, TargetProfile) else resolve_target(target)


def check_target_readiness(files: Mapping[str, str | Path], target: TargetProfile | str | None) -> TargetReadiness:
    """Check each of ``files`` (name -> path, as shipped) against ``target``, and against every newer profile.

    Each file is loaded, type-inferred and hashed once, whatever the number of profiles (a ViT-B graph is 350 MB).
    """
    profile = _profile(target)
    names = [p.name for p in all_targets()]
    newer_profiles = [p for p in all_targets() if names.index(p.name) > names.index(profile.name)]
    reports: dict[str, ReadinessReport] = {}
    newer: dict[str, list[str]] = {p.name: [] for p in newer_profiles}
    for name, path in files.items():
        loaded = _Loaded.read(path)
        reports[name] = _check(loaded, profile)
        for other in newer_profiles:
            newer[other.name] += [f"{name}: {problem}" for problem in _check(loaded, other).problems]
    return TargetReadiness(profile, reports, newer)


def check_tensorrt_readiness(
    onnx_path: str | Path, *, target: TargetProfile | str | None = None, batch_axis: int = 0
) -> ReadinessReport:
    """Report whether ``target``'s TensorRT ONNX parser can take ``onnx_path`` (every problem is named)."""
    return _check(_Loaded.read(onnx_path), _profile(target), batch_axis)


@dataclass(frozen=True)
class _Loaded:
    """One ONNX file as the checks need it: the graph, the inferred dtype of every tensor, its name and sha256."""

    model: onnx.ModelProto
    dtypes: dict[str, str]
    file: str
    sha256: str

    @classmethod
    def read(cls, path: str | Path) -> _Loaded:
        model = onnx.load(str(path), load_external_data=False)
        return cls(model, _tensor_dtypes(model), Path(path).name, sha256_file(path))


def _check(loaded: _Loaded, profile: TargetProfile, batch_axis: int = 0) -> ReadinessReport:
    model, dtypes = loaded.model, loaded.dtypes
    matrix = profile.operators()
    problems: list[str] = []
    warnings: list[str] = []
    opset = _default_opset(model)
    if not profile.opset_min <= opset <= profile.opset_max:
        problems.append(
            f"opset {opset} is outside {profile.opset_min}..{profile.opset_max} parsed by "
            f"TensorRT {profile.tensorrt} ({profile.name})"
        )
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in _all_nodes(model.graph) if n.op_type == "Constant" for o in n.output}
    for node in _all_nodes(model.graph):
        node_problems, node_warnings = _node_findings(node, matrix["operators"], dtypes, constants, profile)
        problems += node_problems
        warnings += node_warnings
    problems += _io_problems(model, batch_axis, profile)
    ops = collections.Counter(n.op_type for n in _all_nodes(model.graph))
    for op in sorted(ops):
        restriction = matrix["operators"].get(op, {}).get("restrictions")
        if restriction and op not in _VERIFIED_RESTRICTIONS:
            warnings.append(f"{op}: TensorRT restriction, not verified here: {restriction}")
    for dtype, cast in profile.cast_down.items():
        if dtype in dtypes.values():
            warnings.append(f"{dtype} tensors are cast down to {cast} by TensorRT {profile.tensorrt}")
    return ReadinessReport(
        not problems,
        _dedupe(problems),
        _dedupe(warnings),
        dict(sorted(ops.items())),
        opset,
        matrix["tensorrt_version"],
        matrix["source"],
        profile.name,
        loaded.file,
        loaded.sha256,
    )


def _accepts(dtype: str, types: list[str], profile: TargetProfile) -> bool:
    return dtype in types or profile.cast_down.get(dtype) in types


def _node_findings(
    node: onnx.NodeProto, operators: dict, dtypes: dict[str, str], constants: set[str], profile: TargetProfile
) -> tuple[list[str], list[str]]:
    """(problems, warnings) for one node: op support, dtype of its data input, and the checkable restrictions."""
    where = f"{node.op_type} node {node.name or '(unnamed)'}"
    release = f"TensorRT {profile.tensorrt}'s ONNX parser ({profile.name})"
    if node.domain not in _DEFAULT_DOMAINS:
        return [f"{where}: custom domain {node.domain!r} needs a TensorRT plugin"], []
    entry = operators.get(node.op_type)
    if entry is None:
        return [f"{where}: op {node.op_type} is not in {release}'s operator list"], []
    if not entry["supported"]:
        return [f"{where}: op {node.op_type} is not supported by {release}"], []
    problems, warnings = [], []
    has_data_input = bool(node.input and node.input[0]) and node.op_type not in _TYPED_BY_OUTPUT
    data = node.input[0] if has_data_input else (node.output[0] if node.output else "")
    dtype = dtypes.get(data)
    if dtype is not None and not _accepts(dtype, entry["types"], profile):
        problems.append(
            f"{where}: dtype {dtype} of {data!r} is not one {release} supports for {node.op_type} "
            f"({', '.join(entry['types'])})"
        )
    if node.op_type == "LayerNormalization" and len([o for o in node.output if o]) > 1:
        problems.append(f"{where}: only the first LayerNormalization output is supported (Mean/InvStdDev are used)")
    if (
        node.op_type in _REDUCE_OPS_WITH_AXES_INPUT
        and len(node.input) > 1
        and node.input[1]
        and node.input[1] not in constants
    ):
        problems.append(f"{where}: reduction axes {node.input[1]!r} must be an initializer")
    if node.op_type in ("Squeeze", "Unsqueeze") and len(node.input) > 1 and node.input[1] not in constants:
        # Computed axes are fine when TensorRT can constant-fold them, which only the parser can tell.
        warnings.append(f"{where}: axes {node.input[1]!r} are computed; TensorRT needs them to fold to a constant")
    if node.op_type == "Constant" and any(
        a.name in ("sparse_value", "value_string", "value_strings") for a in node.attribute
    ):
        problems.append(f"{where}: sparse or string constants are not supported")
    return problems, warnings


def _io_problems(model: onnx.ModelProto, batch_axis: int, profile: TargetProfile) -> list[str]:
    """Every graph input/output dim other than the batch axis must be a positive static size, of an I/O dtype."""
    initializers = {t.name for t in model.graph.initializer}
    problems = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if value.name in initializers:
                continue
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if axis != batch_axis and not (dim.HasField("dim_value") and dim.dim_value > 0):
                    label = dim.dim_param or "unknown"
                    problems.append(
                        f"{kind} {value.name!r} axis {axis} is dynamic ({label}); only the batch axis "
                        f"may be: re-export with a static input size"
                    )
            dtype = _dtype_name(value.type.tensor_type.elem_type)
            if dtype not in profile.io_dtypes and profile.cast_down.get(dtype) not in profile.io_dtypes:
                problems.append(
                    f"{kind} {value.name!r} has dtype {dtype}, which TensorRT {profile.tensorrt} "
                    f"({profile.name}) does not take as a network {kind}"
                )
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
