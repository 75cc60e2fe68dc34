"""INT8 bundles: the Q/DQ graph read back from the file (what is and is not quantized, zero points, dtypes, opset),
the accuracy gate on real images, the sensitivity fallback, and the bad-input errors.

Labels for the gate on these random tiny models are the unmerged model's own predictions on real photo crops: the
reference then scores 100 %, and the INT8 artifact's accuracy is its top-1 agreement, which a broken quantization
loses (tens of points) and a good one keeps within the tolerance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny, perturb_adapter, real_batch, tiny_data_cfg, write_tiny_bundle
from PIL import Image

from peftx.data import InMemoryImageDataset, sample_photos
from peftx.errors import DataError, ExportError, ParityError, UsageError
from peftx.exports import int8
from peftx.exports.accuracy import select
from peftx.exports.bundle import INT8_FILE, read_bundle, validate_bundle
from peftx.exports.layernorm import decomposed_layernorms
from peftx.exports.onnx_export import export_onnx
from peftx.exports.targets import resolve_target
from peftx.exports.tensorrt import _engine_source, builder_flags
from peftx.exports.tensorrt_ops import check_tensorrt_readiness
from peftx.preprocess import eval_transform

FLOAT_OPS = ("LayerNormalization", "Softmax", "Erf", "Add", "ReduceMean", "Sqrt", "Pow", "Div", "Sub", "Mul")


def _crops(n: int, seed: int) -> list[Image.Image]:
    """REAL images: seeded crops of the registry-shipped photos."""
    rng = np.random.default_rng(seed)
    photos, out = sample_photos(), []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.3, 0.9)), int(h * rng.uniform(0.3, 0.9))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out.append(photo.crop((left, top, left + cw, top + ch)).convert("RGB"))
    return out


def _labelled(model, family: str, n: int, seed: int) -> InMemoryImageDataset:
    """Real crops labelled with ``model``'s own top-1 (see the module docstring)."""
    dataset = InMemoryImageDataset(_crops(n, seed), [0] * n, eval_transform(tiny_data_cfg(family)))
    with torch.no_grad():
        pred = model(torch.stack([dataset[i][0] for i in range(n)])).argmax(1)
    dataset.labels = [int(p) for p in pred]
    return dataset


def _request(dataset, n: int = 48, seed: int = 0, **kw) -> int8.Int8Request:
    request = int8.select_calibration(dataset, dataset.targets, n, seed, "calibration crops")
    return int8.Int8Request(**{**request.__dict__, **kw})


def _write(model, family: str, out: Path, *, calibration, target=None, accuracy_n: int = 150, **kw):
    labelled = _labelled(model, family, accuracy_n, seed=1)
    return write_tiny_bundle(
        out,
        model,
        family=family,
        precision="int8",
        target=target,
        accuracy_set=select(labelled, "crops", None),
        int8=calibration,
        **kw,
    )


def _quantized(family: str, tmp_path: Path, target: str = "trt8.6") -> tuple[Path, Path]:
    profile = resolve_target(target)
    cfg = tiny_data_cfg(family)
    fp32 = tmp_path / f"{family}.onnx"
    export_onnx(
        make_tiny(family), fp32, input_size=cfg["input_size"], opset=profile.export_opset, layernorm=profile.layernorm
    )
    q = tmp_path / f"{family}_int8.onnx"
    int8.quantize(fp32, q, real_batch(family, n=32).numpy())
    return fp32, q


def _consumers_of_dq(model: onnx.ModelProto) -> dict[str, list[str]]:
    producer = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in producer and producer[name].op_type == "DequantizeLinear":
                out.setdefault(node.op_type, []).append(node.name)
    return out


@pytest.mark.parametrize(
    "family,target", [("vit", "trt8.6"), ("swin", "trt10"), ("vit_ls_reg", "trt11"), ("vit", "jetpack5")]
)
def test_only_matmul_gemm_conv_inputs_are_quantized(tmp_path, family, target):
    fp32, q = _quantized(family, tmp_path, target)
    model = onnx.load(str(q))
    fed = _consumers_of_dq(model)
    # every MatMul/Gemm/Conv of the FP32 graph is quantized, and nothing else reads a dequantized tensor
    assert set(fed) <= {"MatMul", "Gemm", "Conv"}, fed
    assert set(fed["MatMul"] + fed.get("Gemm", []) + fed["Conv"]) == set(int8.quantizable_nodes(fp32))
    for op in FLOAT_OPS:
        assert op not in fed
    # no MatMul/Gemm/Conv OUTPUT is quantized: no QuantizeLinear reads one
    producer = {o: n for n in model.graph.node for o in n.output}
    q_of = [
        producer[n.input[0]].op_type
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] in producer
    ]
    assert not {"MatMul", "Gemm", "Conv"} & set(q_of)
    profile = resolve_target(target)
    assert int8.graph_problems(q, profile) == []
    assert check_tensorrt_readiness(q, target=profile).problems == []
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == profile.export_opset <= profile.opset_max
    if profile.layernorm == "decomposed":  # TensorRT 8.5: its decomposed LayerNorm is all there, all float
        assert len(decomposed_layernorms(model)) == len(decomposed_layernorms(onnx.load(str(fp32)))) > 0
    assert "peftx_int8" in {p.key for p in model.metadata_props}


def test_zero_points_are_int8_zero_and_weights_per_channel(tmp_path):
    _, q = _quantized("vit", tmp_path)
    model = onnx.load(str(q))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 20
    for node in qdq:
        zp = next(t for t in model.graph.initializer if t.name == node.input[2])
        assert zp.data_type == onnx.TensorProto.INT8 and not inits[node.input[2]].any()
    weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(inits[n.input[0]].dtype == np.int8 for n in weights)
    # per-channel: one scale per output channel on every weight (Conv: axis 0, MatMul [in, out]: axis 1)
    assert all(inits[n.input[1]].size > 1 for n in weights)
    activations = [n for n in qdq if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[1]].size == 1 for n in activations)  # per-tensor


def test_the_checker_catches_an_asymmetric_or_uint8_graph(tmp_path):
    _, q = _quantized("vit", tmp_path)
    model = onnx.load(str(q))
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    zp = next(t for t in model.graph.initializer if t.name == node.input[2])
    zp.CopyFrom(onnx.numpy_helper.from_array(np.array(3, dtype=np.int8), zp.name))
    broken = tmp_path / "asym.onnx"
    onnx.save(model, str(broken))
    assert any("zero point is not 0" in p for p in int8.graph_problems(broken, resolve_target("trt8.6")))
    zp.CopyFrom(onnx.numpy_helper.from_array(np.array(0, dtype=np.uint8), zp.name))
    onnx.save(model, str(broken))
    assert any("not INT8" in p for p in int8.graph_problems(broken, resolve_target("trt8.6")))


@pytest.mark.slow
def test_an_int8_bundle_passes_its_gate_and_runs_from_infer_py(tmp_path):
    model = make_tiny("vit", seed=3)
    calibration = _request(_labelled(model, "vit", 64, seed=7))
    report = _write(model, "vit", tmp_path / "b", calibration=calibration)
    assert report.status == "ok"
    meta = read_bundle(tmp_path / "b")
    assert meta["artifacts"]["onnx_int8"] == INT8_FILE and INT8_FILE in meta["sha256"]
    assert meta["int8"]["calibration"]["images"] == 48 and meta["int8"]["float_nodes"] == []
    assert meta["int8"]["tool"]["name"].startswith("onnxruntime.quantization")
    row = meta["accuracy"]["artifacts"]["onnxruntime int8"]
    assert row["required"] and row["passed"] and row["agreement"] >= 0.97
    assert INT8_FILE in json.loads((tmp_path / "b" / "trt_readiness.json").read_text())["files"]
    parity = json.loads((tmp_path / "b" / "parity.json").read_text())
    assert any(r["candidate"] == "onnxruntime int8" and not r["required"] for r in parity["results"])
    photo = tmp_path / "photo.png"
    _crops(1, seed=9)[0].save(photo)
    run = subprocess.run(
        [sys.executable, str(tmp_path / "b" / "infer.py"), str(photo), "--precision", "int8"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "model_int8.onnx" in run.stderr and len(run.stdout.strip().splitlines()) == 5
    # validate re-measures the INT8 gate, and a changed model_int8.onnx is refused by its sha256
    checked = validate_bundle(
        tmp_path / "b",
        model,
        real_batch("vit", n=8),
        tensorrt="off",
        accuracy_set=select(_labelled(model, "vit", 150, seed=1), "crops", None),
    )
    row = next(r for r in checked.accuracy.results if r.candidate == "onnxruntime int8")
    assert row.required and row.passed
    with open(tmp_path / "b" / INT8_FILE, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ExportError, match="model_int8.onnx \\(sha256 differs\\)"):
        validate_bundle(tmp_path / "b", model, real_batch("vit", n=8), tensorrt="off")


def test_the_gate_fails_a_graph_calibrated_on_constant_images(tmp_path):
    model = make_tiny("vit", seed=3)
    grey = InMemoryImageDataset(
        [Image.new("RGB", (40, 40), (128, 128, 128))] * 48, [0] * 48, eval_transform(tiny_data_cfg("vit"))
    )
    with pytest.raises(ParityError, match="onnxruntime int8"):
        _write(model, "vit", tmp_path / "b", calibration=_request(grey, fallback=False))
    meta = read_bundle(tmp_path / "b")
    assert meta["status"] == "failed"
    row = meta["accuracy"]["artifacts"]["onnxruntime int8"]
    assert not row["passed"] and row["drop"] > 0.05
    assert meta["int8"]["fallback"] == {"ran": False, "reason": "disabled"}


def _with_outlier_channel(model, block: int = 1, channel: int = 3):
    """A model whose fc1 of ``block`` reads one huge input channel (LayerNorm gain 1000) that its weights ignore: the
    FP32 function barely changes, but that MatMul's per-tensor activation scale is set by the outlier, so quantizing
    it rounds every other channel to 0. It is the one very sensitive node."""
    blk = model.blocks[block]
    with torch.no_grad():
        blk.norm2.weight[channel] = 1000.0
        blk.mlp.fc1.weight[:, channel] = 0.0
    return model


@pytest.mark.slow
def test_the_fallback_keeps_the_one_sensitive_node_float(tmp_path):
    model = _with_outlier_channel(make_tiny("vit", seed=3))
    calibration = _request(_labelled(model, "vit", 64, seed=7))
    report = _write(model, "vit", tmp_path / "b", calibration=calibration)
    assert report.status == "ok"
    info = report.int8
    assert info["gate"]["passed"] is False  # the full INT8 graph failed ...
    assert info["fallback"]["passed"] and info["fallback"]["float_nodes"] == ["/blocks/blocks.1/mlp/fc1/MatMul"]
    assert info["fallback"]["ranking"][0]["node"] == "/blocks/blocks.1/mlp/fc1/MatMul"
    assert info["float_nodes"] == ["/blocks/blocks.1/mlp/fc1/MatMul"]  # ... and the shipped graph has it float
    placement = int8.qdq_placement(tmp_path / "b" / INT8_FILE)
    assert placement["float"] == ["/blocks/blocks.1/mlp/fc1/MatMul"] and len(placement["quantized"]) == 13
    assert read_bundle(tmp_path / "b")["accuracy"]["artifacts"]["onnxruntime int8"]["passed"]


@pytest.mark.slow
def test_a_fallback_that_finds_nothing_says_so(tmp_path):
    model = make_tiny("vit", seed=3)
    grey = InMemoryImageDataset(
        [Image.new("RGB", (40, 40), (128, 128, 128))] * 48, [0] * 48, eval_transform(tiny_data_cfg("vit"))
    )
    with pytest.raises(ParityError):
        _write(model, "vit", tmp_path / "b", calibration=_request(grey))
    meta = read_bundle(tmp_path / "b")
    fallback = meta["int8"]["fallback"]
    assert meta["status"] == "failed" and fallback["ran"] and not fallback["passed"]
    assert [len(t["float_nodes"]) for t in fallback["trials"]] == int8.fallback_steps(14) == [1, 2, 3]
    assert fallback["best_accuracy"] == max(t["accuracy"] for t in fallback["trials"])
    assert "gate checks at most" in fallback["bound"]


def test_bad_int8_input_is_refused_before_anything_is_written(tmp_path):
    model = make_tiny("vit", seed=3)
    few = _labelled(model, "vit", 20, seed=7)
    with pytest.raises(DataError, match="fewer than the 32"):
        int8.select_calibration(few, few.targets, 64, 0, "crops")
    with pytest.raises(UsageError, match="at least 32"):
        int8.select_calibration(few, few.targets, 8, 0, "crops")
    with pytest.raises(UsageError, match="calibration-method"):
        int8.check_method("kl")
    import dataclasses

    no_qdq = dataclasses.replace(
        resolve_target("trt8.6"), int8=dataclasses.replace(resolve_target("trt8.6").int8, qdq=False)
    )
    calibration = _request(_labelled(model, "vit", 48, seed=7))
    with pytest.raises(UsageError, match="no symmetric Q/DQ"):
        _write(model, "vit", tmp_path / "b", calibration=calibration, target=no_qdq)
    with pytest.raises(UsageError, match="labelled images"):
        write_tiny_bundle(
            tmp_path / "b", model, provenance={}, images=real_batch("vit", n=4), precision="int8", int8=calibration
        )
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_the_python_builder_rules_per_tensorrt_version(tmp_path):
    for major in (8, 10):
        assert builder_flags("int8", major) == [*resolve_target("trt10").int8.builder_flags, "FP16"] == ["INT8", "FP16"]
        assert builder_flags("fp16", major) == ["FP16"]
    assert builder_flags("int8", 11) == list(resolve_target("trt11").int8.builder_flags) == []
    with pytest.raises(UsageError, match="model_int8.onnx"):
        _engine_source(tmp_path / "model.onnx", None, "int8", 10, tmp_path / "missing.onnx")
    (tmp_path / "model_int8.onnx").write_bytes(b"x")
    assert (
        _engine_source(tmp_path / "model.onnx", None, "int8", 11, tmp_path / "model_int8.onnx").name
        == "model_int8.onnx"
    )


@pytest.mark.slow
def test_merge_export_int8_calibrates_on_the_training_split_and_takes_calibration_data_when_it_moved(tmp_path):
    """A run on an ImageFolder of real digits: INT8 calibrates on its train/ (never test/); after the data folder
    moved, the one-line DataError names --calibration-data, and with it (plus labelled --images) the bundle is made."""
    from conftest import write_digit_folder
    from safetensors.torch import save_file
    from test_cli_errors import CLASSES, make_tiny_run

    from peftx.deploy import merge_export

    plain = make_tiny("vit")
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(base))
    data = write_digit_folder(tmp_path / "digits", CLASSES, {"train": 10, "val": 4, "test": 20})
    run = make_tiny_run(tmp_path, "run", base, data, seed=1)
    report = merge_export(
        run, output=tmp_path / "b", batch=(1, 2, 8), tensorrt="off", simplify=False, precision="int8", calibration=40
    )
    calibration = report.int8["calibration"]
    assert calibration["images"] == 40 and calibration["source"].startswith("train split of")
    assert calibration["per_class"] == {c: 8 for c in CLASSES}  # class-stratified: 40 of 5 x 10
    assert report.parity.accuracy.source.startswith("test split")  # the gate measures test/, calibration train/
    moved = data.rename(tmp_path / "moved")
    with pytest.raises(DataError, match="--calibration-data"):
        merge_export(run, output=tmp_path / "b2", tensorrt="off", precision="int8", calibration=40)
    assert not (tmp_path / "b2").exists()
    report = merge_export(
        run,
        output=tmp_path / "b2",
        batch=(1, 2, 8),
        tensorrt="off",
        simplify=False,
        precision="int8",
        calibration=40,
        calibration_data=moved,
        images_dir=moved / "test",
    )
    assert report.status == "ok" and report.int8["calibration"]["source"].startswith(f"images in {moved / 'train'}")


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_the_histogram_calibrations_give_a_graph_that_holds_too(tmp_path, method):
    profile = resolve_target("trt8.6")
    cfg = tiny_data_cfg("vit")
    fp32 = tmp_path / "vit.onnx"
    export_onnx(make_tiny("vit"), fp32, input_size=cfg["input_size"], opset=profile.export_opset)
    x = real_batch("vit", n=32).numpy()
    minmax, other = tmp_path / "minmax.onnx", tmp_path / f"{method}.onnx"
    int8.quantize(fp32, minmax, x)
    graph = int8.quantize(fp32, other, x, method=method)
    assert graph.method == method and int8.graph_problems(other, profile) == []
    assert (
        json.loads(next(p.value for p in onnx.load(str(other)).metadata_props if p.key == "peftx_int8"))[
            "calibration_method"
        ]
        == method
    )

    def activation_scales(path: Path) -> dict[str, float]:
        model = onnx.load(str(path))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}

    # histogram methods clip outliers: no activation range is wider than MinMax's, and some are narrower
    a, b = activation_scales(minmax), activation_scales(other)
    assert a.keys() == b.keys()
    assert all(b[k] <= a[k] * (1 + 1e-6) for k in a) and any(b[k] < 0.99 * a[k] for k in a)


# --- the exact Q/DQ arithmetic (the gate's) and this CPU's fused int8 kernels (infer.py's, bench's) ---------------


def _one_qdq_matmul(k: int = 768, m: int = 64, n: int = 96) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """One MatMul with symmetric INT8 Q/DQ on both inputs (per-tensor activation, per-channel weight), as
    quantize_static writes them, with inputs whose u8 x s8 pair sums overflow 16 bits; and its exact result:
    integer products summed in int64, then scaled in float64 (TensorRT: int32 accumulation, float rescale)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    sa = np.float32(0.02)
    w = rng.standard_normal((k, n)).astype(np.float32)
    sw = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    qw = np.clip(np.rint(w / sw), -127, 127).astype(np.int8)
    x = (rng.standard_normal((m, k)) * 1.2).astype(np.float32)
    x[:, ::2] = np.abs(x[:, ::2]) + 1.5  # large same-sign neighbours: their pair sums exceed int16
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sa", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sa", "zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["qw", "sw", "zpw"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(sa), "sa"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
        numpy_helper.from_array(qw, "qw"),
        numpy_helper.from_array(sw, "sw"),
        numpy_helper.from_array(np.zeros(n, np.int8), "zpw"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    xq = np.clip(np.rint(x.astype(np.float64) / np.float64(sa)), -128, 127).astype(np.int64)
    exact = (xq @ qw.astype(np.int64)).astype(np.float64) * (np.float64(sa) * sw.astype(np.float64))
    return model, x, exact


def test_the_exact_session_computes_the_qdq_arithmetic_tensorrt_performs():
    import onnxruntime as ort

    model, x, exact = _one_qdq_matmul()
    session = ort.InferenceSession(
        model.SerializeToString(), int8.exact_session_options(ort), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"x": x})[0].astype(np.float64)
    scale = np.abs(exact).max()
    # float32 rounding of a K = 768 sum only (measured 5e-7 of the scale); a saturated or otherwise wrong int8
    # kernel errs by percents (the optimised session on an AVX2 CPU: 12 % of the scale)
    assert np.abs(got - exact).max() <= 1e-5 * scale


def _profiled_op_types(path: Path, options, tmp_path: Path) -> set[str]:
    import onnxruntime as ort

    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    shape = [d.dim_value or 2 for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    session.run(None, {session.get_inputs()[0].name: np.zeros(shape, np.float32)})
    events = json.loads(Path(session.end_profiling()).read_text())
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


def test_the_gate_session_runs_the_qdq_nodes_unfused_and_infer_py_s_session_fuses_them(tmp_path):
    """What ONNX Runtime executes, from its own profile: unoptimised, QuantizeLinear / DequantizeLinear and float
    MatMuls (the exact arithmetic); optimised, int8 kernels (MatMulIntegerToFloat / QLinearMatMul)."""
    import onnxruntime as ort

    _, q = _quantized("vit", tmp_path)
    fused_kinds = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger"}
    exact = _profiled_op_types(q, int8.exact_session_options(ort), tmp_path)
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= exact and not exact & fused_kinds
    optimised = ort.SessionOptions()
    optimised.log_severity_level = 3
    assert _profiled_op_types(q, optimised, tmp_path) & fused_kinds


def test_cpu_int8_kernels_reads_what_the_cpu_accumulates_in():
    avx2 = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n"
    vnni = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
    arm = "Features\t: fp asimd asimddp\n"
    assert int8.cpu_int8_kernels(avx2)["accumulation"] == "16-bit pairs (saturating)"
    assert int8.cpu_int8_kernels(avx2)["cpu"] == "AMD EPYC 7B13"
    assert int8.cpu_int8_kernels(vnni)["accumulation"] == "32-bit"
    assert int8.cpu_int8_kernels(arm)["accumulation"] == "32-bit"
    note = int8.fused_kernels_note(0.2, 0.1, int8.cpu_int8_kernels(avx2))
    assert "no VNNI" in note and "16 bits" in note and "advisory" in note
    from peftx.cli.commands.export_cmd import int8_line

    info = {
        "quantized_count": 14,
        "calibration": {"images": 48},
        "method": "minmax",
        "tool": {"name": "x", "version": "1"},
    }
    assert "fused int8 kernels" not in int8_line({**info, "cpu_kernels": {"agree": True}})
    line = int8_line({**info, "cpu_kernels": {"agree": False, "accumulation": "16-bit pairs (saturating)"}})
    assert "fused int8 kernels differ (16-bit pairs (saturating), advisory" in line


@pytest.mark.slow
def test_the_bundle_reports_the_fused_kernels_against_the_exact_arithmetic_and_check_uses_the_exact_one(tmp_path):
    """The verdict rests on the exact arithmetic; the fused kernels get an advisory row and, where they disagree on
    this CPU, a note naming why. infer.py --check's INT8 line runs the exact session too and says so."""
    model = make_tiny("vit", seed=3)
    report = _write(model, "vit", tmp_path / "b", calibration=_request(_labelled(model, "vit", 64, seed=7)))
    assert report.status == "ok"
    parity = json.loads((tmp_path / "b" / "parity.json").read_text())
    rows = {r["candidate"]: r for r in parity["results"]}
    # the FP32 bounds come from the noise measured in this run (the unmerged model in float64 on the same inputs)
    assert rows["merged PyTorch"]["tolerance"]["name"] == "merge_fp32_measured"
    assert rows["onnxruntime fp32"]["tolerance"]["name"] == "onnxruntime_fp32_measured"
    assert any(note.startswith("FP32 rounding noise of the unmerged model") for note in parity["notes"])
    assert read_bundle(tmp_path / "b")["reference_set"]["tolerances"]["fp32"]["name"] == "onnxruntime_fp32_measured"
    fused = rows["onnxruntime int8 fused kernels"]
    assert fused["reference"] == "onnxruntime int8" and not fused["required"]
    kernels = read_bundle(tmp_path / "b")["int8"]["cpu_kernels"]
    assert kernels["agree"] == fused["passed"] and kernels["max_abs"] == fused["overall"]["max_abs"]
    assert kernels["accumulation"] == int8.cpu_int8_kernels()["accumulation"]
    assert bool(kernels["note"]) == (not kernels["agree"]) and (kernels["note"] in parity["notes"]) != kernels["agree"]
    accuracy = {r["candidate"]: r for r in parity["accuracy"]["results"]}
    assert accuracy["onnxruntime int8"]["required"] and not accuracy["onnxruntime int8 fused kernels"]["required"]
    run = subprocess.run(
        [sys.executable, str(tmp_path / "b" / "infer.py"), "--check", "--precision", "int8"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASS  int8 model_int8.onnx (onnxruntime, exact Q/DQ)" in run.stdout
    # where the fused kernels disagree on the reference set (other images than parity's), the line says why
    notes = [line for line in run.stdout.splitlines() if line.startswith("note  model_int8.onnx")]
    saturating = kernels["accumulation"] == "16-bit pairs (saturating)"
    assert len(notes) <= 1 and all(("has no VNNI" in line) == saturating for line in notes)
    # the advisory line itself, made to fire: fused outputs against "exact" ones moved by 1.0
    from peftx.exports.accuracy import load_infer_module

    shipped = load_infer_module(tmp_path / "b" / "infer.py")
    with np.load(tmp_path / "b" / "reference_set.npz") as npz:
        inputs = npz["inputs"]
    exact = shipped.OnnxBackend(tmp_path / "b" / INT8_FILE, "int8", exact=True)(inputs)
    tol = read_bundle(tmp_path / "b")["reference_set"]["tolerances"]["int8"]
    assert shipped._fused_int8_line(tmp_path / "b" / INT8_FILE, inputs, exact + 1.0, tol, 8).startswith("note  ")


def test_the_device_check_holds_int8_to_the_graph_the_gate_judged(tmp_path):
    """infer.py --check compares an INT8 run with the same Q/DQ graph as run where the bundle was made
    (reference_set.npz's int8_logits): a bundle whose gate passed passes its own check even where the INT8 logits
    moved far from the FP32 model's (this perturbed model: cosine ~0.97 against it), and a graph quantized otherwise
    (calibrated on constant images, put in place with --no-verify) fails it."""
    model = make_tiny("vit", seed=4)
    perturb_adapter(model)
    out = tmp_path / "b"
    _write(model, "vit", out, calibration=_request(_labelled(model, "vit", 32, seed=2)), accuracy_n=40)
    with np.load(out / "reference_set.npz") as npz:
        int8_logits, unmerged = npz["int8_logits"], npz["reference_logits"]
    assert int8_logits.shape == unmerged.shape and not np.allclose(int8_logits, unmerged, atol=1e-3)
    check = [sys.executable, str(out / "infer.py"), "--check", "--precision", "int8"]
    done = subprocess.run(check, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    assert "against model_int8.onnx (ONNX Runtime, exact Q/DQ) here" in done.stdout
    broken = tmp_path / "broken.onnx"
    int8.quantize(out / "model.onnx", broken, np.zeros((32, *tiny_data_cfg("vit")["input_size"]), np.float32))
    broken.replace(out / INT8_FILE)
    done = subprocess.run([*check, "--no-verify"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "FAIL  int8 model_int8.onnx" in done.stdout, done.stdout
