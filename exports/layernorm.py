"""Find LayerNorm in an ONNX graph, fused (one LayerNormalization node) or decomposed (what opset <= 16 exports).

TensorRT 8.5's parser has no LayerNormalization, so a trt8.5 export carries every LayerNorm as
``ReduceMean -> Sub -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div`` (then the affine Mul/Add). That subgraph is
the best-known ViT FP16 failure: the squares overflow FP16 once activations pass ~256. An FP16 build for such a
target pins exactly these nodes to FP32 (trtexec ``--layerPrecisions``, the Python builder's per-layer precision,
and the FP16 ONNX's node block list), so they must be found by structure, not guessed from names. The ONNX parser
names each TensorRT layer after its ONNX node (onnx-tensorrt ``registerLayer(layer, getNodeName(node))``), which is
why node names are what this module returns.

RMSNorm (Eva variants with ``norm_layer="rmsnorm"``) has the same hazard without the centring: at opset 16 it is
exported as ``Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div`` (``onnx_export``'s symbolic, timm's fallback formula),
and is pinned to FP32 with the LayerNorms.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx
from onnx import numpy_helper

_SAFE_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-")


@dataclass(frozen=True)
class DecomposedLayerNorm:
    """The nodes of one decomposed LayerNorm, in graph order of the computation."""

    mean: str
    sub: str
    square: str
    variance: str
    add_eps: str
    sqrt: str
    div: str

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.mean, self.sub, self.square, self.variance, self.add_eps, self.sqrt, self.div)


@dataclass(frozen=True)
class DecomposedRmsNorm:
    """The nodes of one decomposed RMSNorm, x / sqrt(mean(x^2) + eps), in graph order of the computation."""

    square: str
    mean: str
    add_eps: str
    sqrt: str
    div: str

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.square, self.mean, self.add_eps, self.sqrt, self.div)


def fused_layernorms(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "LayerNormalization"]


def decomposed_layernorms(model: onnx.ModelProto) -> list[DecomposedLayerNorm]:
    """Every ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)`` in the main graph, found from its Sqrt."""
    return [m for m in _decomposed_norms(model) if isinstance(m, DecomposedLayerNorm)]


def decomposed_rmsnorms(model: onnx.ModelProto) -> list[DecomposedRmsNorm]:
    """Every ``x / sqrt(mean(x^2) + eps)`` in the main graph, found from its Sqrt."""
    return [m for m in _decomposed_norms(model) if isinstance(m, DecomposedRmsNorm)]


def _decomposed_norms(model: onnx.ModelProto) -> list[DecomposedLayerNorm | DecomposedRmsNorm]:
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = _constant_values(graph)
    found: list[DecomposedLayerNorm | DecomposedRmsNorm] = []
    for sqrt in (n for n in graph.node if n.op_type == "Sqrt"):
        match = _match_from_sqrt(sqrt, producer, consumers, constants)
        if match is not None:
            found.append(match)
    return found


def fp32_node_names(model: onnx.ModelProto, groups: Iterable[str]) -> list[str]:
    """Names of the nodes a target keeps FP32 in FP16 builds; ``groups`` come from TargetProfile.fp16_fp32_nodes
    ("layernorm": every LayerNorm, fused or decomposed, and every decomposed RMSNorm)."""
    names: list[str] = []
    for group in groups:
        if group != "layernorm":
            raise ValueError(f"unknown FP32 node group {group!r}")
        names += [name for norm in _decomposed_norms(model) for name in norm.nodes]
        names += fused_layernorms(model)
    return list(dict.fromkeys(names))


def unsafe_layer_names(names: Iterable[str]) -> list[str]:
    """Names trtexec's ``--layerPrecisions=name:fp32,...`` cannot carry (its separators ':' ',' and shell quoting)."""
    return [n for n in names if not n or not set(n) <= _SAFE_NAME]


def _constant_values(graph: onnx.GraphProto) -> dict[str, float]:
    """Scalar value of every one-element initializer / Constant output (the Pow exponent, the eps)."""
    values = {}
    for tensor in graph.initializer:
        if _size(tensor.dims) == 1:
            values[tensor.name] = float(numpy_helper.to_array(tensor).reshape(-1)[0])
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and _size(attr.t.dims) == 1:
                    values[node.output[0]] = float(numpy_helper.to_array(attr.t).reshape(-1)[0])
    return values


def _size(dims) -> int:
    size = 1
    for d in dims:
        size *= d
    return size


def _match_from_sqrt(sqrt, producer, consumers, constants) -> DecomposedLayerNorm | DecomposedRmsNorm | None:
    add_eps = producer.get(sqrt.input[0])
    if add_eps is None or add_eps.op_type != "Add":
        return None
    others = [i for i in add_eps.input]
    variance = next((producer[i] for i in others if i in producer and producer[i].op_type == "ReduceMean"), None)
    if variance is None or not any(i in constants for i in others):
        return None
    square = producer.get(variance.input[0])
    if square is None or not _is_square(square, constants):
        return None
    sub = producer.get(square.input[0])
    if sub is None or sub.op_type != "Sub":  # no centring: an RMSNorm when x / sqrt(...) follows
        rms_div = _div_by(sqrt, square.input[0], consumers)
        if rms_div is None:
            return None
        return DecomposedRmsNorm(square.name, variance.name, add_eps.name, sqrt.name, rms_div.name)
    mean = producer.get(sub.input[1])
    if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != sub.input[0]:
        return None
    div = _div_by(sqrt, sub.output[0], consumers)
    if div is None:
        return None
    return DecomposedLayerNorm(mean.name, sub.name, square.name, variance.name, add_eps.name, sqrt.name, div.name)


def _div_by(sqrt, numerator: str, consumers):
    """The Div node computing ``numerator / sqrt``, or None."""
    return next(
        (
            c
            for c in consumers.get(sqrt.output[0], [])
            if c.op_type == "Div" and c.input[0] == numerator and c.input[1] == sqrt.output[0]
        ),
        None,
    )


def _is_square(node, constants) -> bool:
    if node.op_type == "Pow":
        return constants.get(node.input[1]) == 2.0
    return node.op_type == "Mul" and node.input[0] == node.input[1]  # d * d, as a simplifier may rewrite it
