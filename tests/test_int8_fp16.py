"""Strongly typed targets (TensorRT 11): the INT8 graph's float parts in FP16 by peftx's FP16 rules, Q/DQ scales in
FP16 at opset 19, checked with ONNX Runtime and the accuracy gate; weakly typed targets keep today's graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_tiny
from test_handoff import run_infer
from test_int8 import _labelled, _quantized, _request, _write

from peftx.errors import ExportError
from peftx.exports import int8, int8_fp16
from peftx.exports.fp16 import FP32_OPS
from peftx.exports.targets import all_targets, resolve_target
from peftx.tolerances import INT8

FLOAT16, FLOAT = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def trt11_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = make_tiny("vit")
    out = tmp_path_factory.mktemp("trt11") / "bundle"
    _write(model, "vit", out, calibration=_request(_labelled(model, "vit", 64, seed=0)), target="trt11", accuracy_n=60)
    return out


def _types(model: onnx.ModelProto) -> dict[str, int]:
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def test_only_tensorrt_11_is_strongly_typed():
    assert [t.name for t in all_targets() if int8_fp16.strongly_typed(t)] == ["trt11"]


def test_the_trt11_int8_graph_computes_its_float_parts_in_fp16(trt11_bundle):
    meta = json.loads((trt11_bundle / "metadata.json").read_text())
    assert meta["status"] == "ok" and meta["int8"]["float_parts"] == "fp16" and meta["int8"]["opset"] == 19
    assert meta["accuracy"]["artifacts"]["onnxruntime int8"]["passed"]  # the gate ran on the graph as shipped
    path = trt11_bundle / "model_int8.onnx"
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 19
    assert int8.graph_problems(path, resolve_target("trt11")) == []
    placement = int8.qdq_placement(path)
    assert placement["quantized"] and not placement["partial"] and not placement["elsewhere"]
    inits = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(inits[n.input[1]].data_type == FLOAT16 for n in qdq)  # DQ hands its GEMM FP16 directly
    types = _types(model)
    gemms = [n for n in model.graph.node if n.op_type in int8.QUANTIZED_OPS and n.name in placement["quantized"]]
    assert all(types[n.input[0]] == FLOAT16 for n in gemms)
    kept = [n for n in model.graph.node if n.op_type in FP32_OPS]
    assert kept and all(types[n.input[0]] == FLOAT for n in kept)  # LayerNorm, Softmax: FP32 as in model_fp16.onnx
    adds = [n for n in model.graph.node if n.op_type in ("Add", "Mul", "Erf", "Div")]
    assert sum(types.get(n.output[0]) == FLOAT16 for n in adds) > len(adds) // 2  # the float parts are FP16 now
    props = {p.key: p.value for p in model.metadata_props}
    assert props["peftx_int8_float_parts"] == "fp16" and "precision" not in props  # still the INT8 graph
    done = run_infer(trt11_bundle, "--check", "--precision", "int8")  # the device's check, ONNX Runtime
    assert done.returncode == 0, done.stdout + done.stderr


def test_weakly_typed_targets_keep_the_fp32_float_parts(tmp_path):
    fp32, q = _quantized("vit", tmp_path, target="trt10")
    assert int8_fp16.float_parts(q) == "fp32"
    with pytest.raises(ExportError, match="opset 19, trt8.6's parser stops at 17"):
        int8_fp16.half_float_parts(q, resolve_target("trt8.6"))


def test_half_float_parts_stays_close_to_the_fp32_float_graph(tmp_path):
    """The same Q/DQ graph with FP16 float parts, on real images under ONNX Runtime: top-1 and logits agree with
    the FP32-float graph within the INT8 parity bound (an FP16-rounded activation may land on the next INT8 step)."""
    from conftest import real_batch

    _, q = _quantized("vit", tmp_path, target="trt11")
    half = tmp_path / "half.onnx"
    half.write_bytes(q.read_bytes())
    x = real_batch("vit", n=16).numpy()
    info = int8_fp16.half_float_parts(half, resolve_target("trt11"), calibration=x[:8])
    assert info["opset_from"] == 17 and info["opset"] == 19 and "LayerNormalization" in info["kept_fp32_ops"]

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]

    a, b = run(q), run(half)
    assert not np.array_equal(a, b)  # it did change the graph
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    assert np.abs(a - b).max() <= INT8.bound(float(np.abs(a).max()))  # the INT8 parity bound (tolerances.py)
    assert int8_fp16.half_float_parts(half, resolve_target("trt11")) == info  # converting twice changes nothing
