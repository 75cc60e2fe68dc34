"""FP16 ONNX: the graph a TensorRT 11 FP16 build consumes (strongly typed) and the FP16 emulation ONNX Runtime runs.

Conversion is ONNX Runtime's ``convert_float_to_float16`` with ``keep_io_types=True`` (inputs/outputs stay FP32, so
the same preprocessing and runners apply). onnxconverter-common's converter is not used: on timm ViT/Swin exports it
produced graphs that fail to load (a Cast type mismatch).

What stays FP32, and why:

* by op type (``FP32_OPS``): normalisations and reductions whose intermediates are sums of squares or of many terms
  (LayerNormalization's variance overflows FP16 once activations pass ~256 on 768 channels), Softmax/LogSoftmax and
  Exp (exp overflows FP16 above ~11), Pow/Sqrt (a decomposed LayerNorm). They are cheap next to the GEMMs, and
  TensorRT itself keeps LayerNorm in FP32 under mixed precision. ONNX Runtime's default block list (ops without FP16
  kernels) is kept as well.
* by name (``keep_fp32_nodes``): what the deployment target pins to FP32 in its FP16 engine build, so the FP16
  ONNX (the emulation that is checked here, and TensorRT 11's build input) keeps the same nodes FP32 — for
  TensorRT 8.5 the whole decomposed LayerNorm subgraph (ReduceMean/Sub/Pow/Add/Sqrt/Div, see ``layernorm.py``).
* by value (``large_magnitude_nodes``): with calibration inputs, every node that reads or writes a value with
  magnitude above ``FP16_SAFE_MAX`` stays FP32. Large-activation outliers exist in big ViTs (e.g. DINOv2 registers);
  an FP16 GEMM fed such a value overflows to inf, so the *consumer* must stay FP32 too, hence inputs and outputs.

Emulation caveat, measured here: ONNX Runtime's CPU provider has no FP16 kernels for most ops; it wraps them in
Casts, runs them in FP32 and drops the Cast pairs between them, so running the FP16 graph on CPU rounds the weights
but hardly any activations, and cannot overflow. ``strict_fp16_emulation`` therefore writes a second, FP32 graph with
explicit FP16 round trips (Cast to half and back, which ONNX Runtime keeps) on every tensor the FP16 graph stores in
half precision: rounding and overflow where a GPU running the FP16 graph would have them, arithmetic in FP32 (as
TensorRT's FP16 GEMMs accumulate).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from peftx.errors import ExportError

from . import onnx_io

FP32_OPS: tuple[str, ...] = (
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",  # variance = mean of squares
    "Softmax",
    "LogSoftmax",
    "Exp",  # exp overflows FP16 above ~11
    "Pow",
    "Sqrt",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",  # decomposed norms, long sums
)

# FP16's largest finite value is 65504. A node whose calibration inputs/outputs exceed 1e4 is within a factor 6.5 of
# overflow: real inputs outside the calibration set may cross it, so such nodes stay FP32. Not a parity tolerance
# (those live in peftx.tolerances); a range margin for the conversion.
FP16_SAFE_MAX = 1.0e4

# The by-value pass exposes intermediate tensors as graph outputs. One run holds about _PROBE_BYTES of them, whatever
# the model's or the calibration set's size: as many images per run (up to _MAX_IMAGES_PER_RUN) as fit with every
# tensor exposed, so small models take one pass (ViT-B/16: ~1 GB of float tensors an image); a model whose single
# image does not fit (ViT-H/14: ~3 GB) takes one image per run and its tensors in as few chunks as fit. Each chunk
# is one more forward pass over the calibration set, which is what the pass's time grows with.
_PROBE_BYTES = 2 << 30
_MAX_IMAGES_PER_RUN = 4


@dataclass
class Fp16Result:
    path: Path
    blocked_ops: list[str]
    blocked_nodes: list[str] = field(default_factory=list)  # kept FP32 by name and for large magnitudes
    calibration_max_abs: float = 0.0  # largest |value| seen in any float tensor during calibration
    pinned_nodes: list[str] = field(default_factory=list)  # the target's FP32 nodes (a subset of blocked_nodes)

    def to_json(self) -> dict:
        return {
            "path": self.path.name,
            "blocked_ops": self.blocked_ops,
            "blocked_nodes": self.blocked_nodes,
            "pinned_nodes": self.pinned_nodes,
            "calibration_max_abs": self.calibration_max_abs,
            "fp16_safe_max": FP16_SAFE_MAX,
        }


def convert_to_fp16(
    src: str | Path,
    dst: str | Path,
    *,
    calibration: np.ndarray | None = None,
    op_block_list: Iterable[str] = FP32_OPS,
    safe_max: float = FP16_SAFE_MAX,
    keep_fp32_nodes: Iterable[str] = (),
) -> Fp16Result:
    """Write an FP16 copy of ``src`` with FP32 inputs/outputs to ``dst``.

    ``calibration`` (a batch of real preprocessed images) enables the by-value block list; without it only the op-type
    block list applies. ``keep_fp32_nodes`` names nodes that stay FP32 whatever their values. metadata_props are
    carried over.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    src, dst = Path(src), Path(dst)
    model = onnx_io.load(src)
    props = {p.key: p.value for p in model.metadata_props}
    ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(op_block_list))
    nodes, seen_max = ([], 0.0) if calibration is None else large_magnitude_nodes(src, model, calibration, safe_max)
    pinned = list(keep_fp32_nodes)
    missing = sorted(set(pinned) - {n.name for n in model.graph.node})
    if missing:
        raise ExportError(
            f"nodes to keep FP32 are not in {src.name}: {', '.join(missing[:3])}",
            "pass node names of this graph (see peftx.exports.layernorm)",
        )
    nodes = list(dict.fromkeys([*pinned, *nodes]))
    try:
        _infer_value_info(model)  # on the graph alone: the converter's own inference serialises the whole model
        fp16 = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=ops, node_block_list=nodes or None, disable_shape_infer=True
        )
        _drop_half_round_trips(fp16)
        _toposort(fp16.graph)  # the converter appends the input Casts at the end; the checker requires order
        onnx.helper.set_model_props(fp16, {**props, "precision": "fp16"})
        onnx_io.save(fp16, dst)
        onnx_io.check(dst)
    except Exception as exc:  # noqa: BLE001 - surface any converter/checker failure as an export failure
        raise ExportError(
            f"FP16 conversion of {src.name} failed: {type(exc).__name__}: {exc}",
            "export FP32 only (precision='fp32') and report the model",
        ) from exc
    return Fp16Result(dst, sorted(set(op_block_list)), nodes, seen_max, pinned)


def strict_fp16_emulation(fp32_path: str | Path, fp16_path: str | Path, dst: str | Path) -> Path:
    """Write the FP32 graph with every tensor that ``fp16_path`` holds in FP16 rounded through FP16 (see module doc)."""
    model = onnx_io.load(fp32_path)
    half = _half_tensors(onnx_io.load(fp16_path, weights=False))
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name in half and tensor.data_type == onnx.TensorProto.FLOAT:
            rounded = _to_half(numpy_helper.to_array(tensor)).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(rounded, tensor.name))
    round_trips = []
    for node in model.graph.node:
        for j, name in enumerate(node.output):
            if name in half:
                node.output[j] = f"{name}__fp32"
                round_trips += [
                    onnx.helper.make_node(
                        "Cast",
                        [f"{name}__fp32"],
                        [f"{name}__fp16"],
                        name=f"{name}__to_fp16",
                        to=onnx.TensorProto.FLOAT16,
                    ),
                    onnx.helper.make_node(
                        "Cast", [f"{name}__fp16"], [name], name=f"{name}__to_fp32", to=onnx.TensorProto.FLOAT
                    ),
                ]
    model.graph.node.extend(round_trips)
    _toposort(model.graph)
    del model.graph.value_info[:]  # stale: outputs were renamed
    return onnx_io.save(model, dst)


def _infer_value_info(model: onnx.ModelProto) -> None:
    """Replace ``model``'s value_info by onnx's shape inference run on its graph without the weights' values, which
    works at any model size (the inferred types are what the FP16 converter reads)."""
    inferred = onnx.shape_inference.infer_shapes(onnx_io.graph_only(model))
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)


def _half_tensors(fp16_model: onnx.ModelProto) -> set[str]:
    """Names of the initialisers and activations an FP16 graph stores as FLOAT16."""
    graph = onnx.shape_inference.infer_shapes(onnx_io.graph_only(fp16_model)).graph
    produced = {out for node in graph.node for out in node.output}
    half = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    half |= {
        v.name
        for v in graph.value_info
        if v.name in produced and v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    }
    return half


def _to_half(array: np.ndarray) -> np.ndarray:
    """FP32 -> FP16 saturating at +-65504 like the converter does for weights (activations overflow to inf instead)."""
    return np.clip(array, -65504.0, 65504.0).astype(np.float16)


def large_magnitude_nodes(
    src: Path, model: onnx.ModelProto, calibration: np.ndarray, safe_max: float = FP16_SAFE_MAX
) -> tuple[list[str], float]:
    """Nodes of ``model`` (the graph at ``src``, loaded with its weights) reading or writing a float value with
    |value| > ``safe_max`` on ``calibration``, and the max seen."""
    peaks = _float_tensor_peaks(src, calibration)
    peaks.update(
        {
            t.name: _peak(numpy_helper.to_array(t))
            for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT
        }
    )
    hot = {name for name, peak in peaks.items() if peak > safe_max}
    nodes = [n.name for n in model.graph.node if hot.intersection(n.input) or hot.intersection(n.output)]
    if any(not name for name in nodes):
        raise ExportError("a node that must stay FP32 has no name", "re-export; exporters name every node")
    return nodes, max(peaks.values(), default=0.0)


def _float_tensor_peaks(src: Path, calibration: np.ndarray) -> dict[str, float]:
    """max |value| of every FP32 activation of the graph at ``src`` on ``calibration`` (see ``_PROBE_BYTES``). The
    probe graphs refer to one weights file (``src``'s own, or a copy written once for a one-file model) instead of
    each holding the weights in memory."""
    model = onnx_io.load(src, weights=False)
    inferred = onnx.shape_inference.infer_shapes(onnx_io.graph_only(model))
    sizes = activation_bytes(inferred)
    images = images_per_run(sum(sizes.values()), _PROBE_BYTES, _MAX_IMAGES_PER_RUN)
    feed_name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor addressable
    feed = calibration.astype(np.float32)
    peaks: dict[str, float] = {feed_name: _peak(calibration)}
    with onnx_io.weights_in_a_file(model, beside=src) as graph_path:
        for chunk in _chunks(sizes, _PROBE_BYTES // images):
            probe = onnx.ModelProto()
            probe.CopyFrom(model)  # the graph only: its weights are in the file
            del probe.graph.output[:]
            outputs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in chunk]
            probe.graph.output.extend(outputs)
            with onnx_io.session_source(probe, beside=graph_path) as source:
                session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
                for first in range(0, len(feed), images):
                    outputs = session.run(chunk, {feed_name: feed[first : first + images]})
                    for name, value in zip(chunk, outputs, strict=True):
                        peaks[name] = max(peaks.get(name, 0.0), _peak(value))
                del session
    return peaks


def activation_bytes(inferred: onnx.ModelProto) -> dict[str, int]:
    """Bytes per image of every FP32 activation of a shape-inferred graph, in graph order."""
    return {
        vi.name: 4 * _elements_per_image(vi)
        for vi in [*inferred.graph.value_info, *inferred.graph.output]
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }


def images_per_run(bytes_per_image: int, budget: int, most: int) -> int:
    """How many images one run over a graph exposing ``bytes_per_image`` of activations may take (1..``most``)."""
    return max(1, min(most, budget // max(bytes_per_image, 1)))


def _elements_per_image(value_info: onnx.ValueInfoProto) -> int:
    """Elements of one image's tensor: static dims multiplied, the (symbolic) batch dim counted once; unknown -> 1M."""
    if not value_info.type.tensor_type.HasField("shape"):
        return 1 << 20
    count = 1
    for dim in value_info.type.tensor_type.shape.dim:
        count *= dim.dim_value if dim.HasField("dim_value") else 1
    return count


def _chunks(sizes: dict[str, int], budget: int) -> list[list[str]]:
    """The tensor names in graph order, cut into runs of at most ``budget`` bytes per image (at least one each)."""
    chunks: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return [chunk for chunk in chunks if chunk]


def _peak(array: np.ndarray) -> float:
    """max |value|; inf counts (an FP32 overflow is certainly out of FP16 range), NaN is ignored."""
    return float(np.nanmax(np.abs(array))) if array.size else 0.0


def _drop_half_round_trips(model: onnx.ModelProto) -> int:
    """Remove FP32 -> FP16 -> FP32 Cast pairs; returns how many were removed.

    The converter casts every blocked node's output to FP16 and back even when the consumer is blocked too, so a
    value kept in FP32 because it is too large for FP16 would still overflow between two FP32 nodes. The round trip
    can only lose precision: its consumers read the FP32 value directly instead.
    """
    graph = model.graph
    types = _elem_types(model)
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    rename, dropped, first_casts = {}, set(), set()
    for i, node in enumerate(nodes):
        if not _is_cast_to(node, onnx.TensorProto.FLOAT) or node.output[0] in graph_outputs:
            continue
        j = producer.get(node.input[0])
        if (
            j is not None
            and _is_cast_to(nodes[j], onnx.TensorProto.FLOAT16)
            and types.get(nodes[j].input[0]) == onnx.TensorProto.FLOAT
        ):
            rename[node.output[0]] = nodes[j].input[0]
            dropped.add(i)
            first_casts.add(j)
    if not rename:
        return 0
    for node in nodes:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
    used = {name for i, node in enumerate(nodes) if i not in dropped for name in node.input} | graph_outputs
    dropped |= {j for j in first_casts if nodes[j].output[0] not in used}
    kept = [_copy(node) for i, node in enumerate(nodes) if i not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    produced = {out for node in kept for out in node.output}
    stale = [v for v in graph.value_info if v.name not in produced]
    for value in stale:
        graph.value_info.remove(value)
    return len(rename)


def _is_cast_to(node: onnx.NodeProto, elem_type: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == elem_type for a in node.attribute)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = onnx.shape_inference.infer_shapes(onnx_io.graph_only(model)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` topologically (Kahn), keeping the original order among independent nodes."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    consumers: dict[int, list[int]] = collections.defaultdict(list)
    indegree = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for j in {producer[name] for name in node.input if name in producer}:
            consumers[j].append(i)
            indegree[i] += 1
    ready = collections.deque(i for i, d in enumerate(indegree) if d == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for c in consumers[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    if len(order) != len(nodes):
        raise ExportError("the FP16 graph has a cycle", "report the model; the FP32 graph is unaffected")
    sorted_nodes = [_copy(nodes[i]) for i in order]  # detached copies: deleting from a repeated field frees them
    del graph.node[:]
    graph.node.extend(sorted_nodes)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    return clone
