"""ONNX export, FP16 conversion, onnxslim and TensorRT readiness on real (tiny, random-init) timm models."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper

from peftx.errors import UsageError
from peftx.exports.fp16 import convert_to_fp16, strict_fp16_emulation
from peftx.exports.onnx_export import export_onnx, op_histogram, param_count, read_metadata
from peftx.exports.parity import compare, make_input_sets
from peftx.exports.runners import OnnxRuntimeRunner, TorchRunner
from peftx.exports.simplify import simplify_onnx
from peftx.exports.tensorrt_ops import check_tensorrt_readiness, supported_ops
from peftx.tolerances import FP16, ONNX_FP32

FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, depth=2)),
    "vit_reg": (
        "vit_small_patch14_reg4_dinov2",
        dict(img_size=28, depth=2, embed_dim=64, num_heads=2, init_values=0.1),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2)),
    ),
}


def tiny(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    name, kw = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=5, **{"exportable": True, **kw, **overrides}).eval()


def input_size(family: str) -> tuple[int, int, int]:
    size = FAMILIES[family][1]["img_size"]
    return (3, size, size)


def real_images(size: int, n: int = 8) -> np.ndarray:
    """n crops of sklearn's two sample photos, through timm's eval transform at ``size`` px."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from timm.data import create_transform

    transform = create_transform(
        input_size=(3, size, size),
        interpolation="bicubic",
        crop_pct=0.9,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    crops = []
    for photo in load_sample_images().images:
        h, w, _ = photo.shape
        for i in range(n // 2):
            crop = photo[i * h // 8 : i * h // 8 + h // 2, i * w // 8 : i * w // 8 + w // 2]
            crops.append(transform(Image.fromarray(crop)).numpy())
    return np.stack(crops)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Each family exported once with the default (TorchScript, opset 17) exporter."""
    out = tmp_path_factory.mktemp("onnx")
    models = {}
    for family in FAMILIES:
        model = tiny(family)
        path = export_onnx(model, out / f"{family}.onnx", input_size=input_size(family), metadata={"family": family})
        models[family] = (model, path)
    return models


@pytest.mark.parametrize("family", FAMILIES)
def test_export_passes_full_checker_with_dynamic_batch_only(exported, family):
    _, path = exported[family]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", *input_size(family)]
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == ["batch", 5]
    assert read_metadata(path) == {"family": family, "onnx_exporter": "torchscript opset 17"}
    assert op_histogram(path)["LayerNormalization"] >= 2  # opset 17: one node per LayerNorm, not ReduceMean/Pow


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_matches_torch_on_real_images_at_odd_batches(exported, family):
    model, path = exported[family]
    inputs = make_input_sets(real_images(input_size(family)[1]), (1, 3, 7), random_batch=0)
    logits = model(torch.from_numpy(inputs["real_b7"])).detach()
    assert logits.std(dim=0).min() > 1e-3, "the images must give different outputs, or parity proves little"
    result = compare(TorchRunner(model), OnnxRuntimeRunner(path), inputs, ONNX_FP32)
    assert result.passed, result.overall.failures
    assert set(result.sets) == {"real_b1", "real_b3", "real_b7"}
    assert result.overall.max_abs < 1e-5  # measured ~1e-6: FP32 kernels differ, the math is the same


def test_dynamo_exporter_gives_the_same_function(tmp_path):
    model = tiny("vit")
    path = export_onnx(model, tmp_path / "dynamo.onnx", input_size=input_size("vit"), exporter="dynamo")
    assert read_metadata(path)["onnx_exporter"] == "dynamo opset 18"
    inputs = make_input_sets(real_images(32), (1, 3), random_batch=0)
    assert compare(TorchRunner(model), OnnxRuntimeRunner(path), inputs, ONNX_FP32).passed


def test_two_exports_of_one_architecture_have_equal_graphs(exported, tmp_path):
    other = tiny("vit", seed=1)
    first = exported["vit"][1]
    second = export_onnx(other, tmp_path / "other.onnx", input_size=input_size("vit"))
    assert not torch.equal(other.head.weight, exported["vit"][0].head.weight)
    assert op_histogram(second) == op_histogram(first)
    assert param_count(second) == param_count(first)
    assert param_count(first) > 0.99 * sum(p.numel() for p in other.parameters())
    assert op_histogram(exported["swin"][1]) != op_histogram(first)


def test_export_refuses_fused_attention_and_training_mode(tmp_path):
    fused = tiny("vit", exportable=False)
    if not any(getattr(m, "fused_attn", False) for m in fused.modules()):
        pytest.skip("this timm build does not use fused attention here")
    with pytest.raises(UsageError, match="exportable=True"):
        export_onnx(fused, tmp_path / "x.onnx", input_size=input_size("vit"))
    with pytest.raises(UsageError, match="training mode"):
        export_onnx(tiny("vit").train(), tmp_path / "x.onnx", input_size=input_size("vit"))
    with pytest.raises(UsageError, match="batch_for_trace"):
        export_onnx(tiny("vit"), tmp_path / "x.onnx", input_size=input_size("vit"), batch_for_trace=1)
    with pytest.raises(UsageError, match="opset"):
        export_onnx(tiny("vit"), tmp_path / "x.onnx", input_size=input_size("vit"), opset=13)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_fp16_model_runs_in_onnxruntime_within_fp16_tolerance(exported, family, tmp_path):
    model, path = exported[family]
    images = real_images(input_size(family)[1])
    result = convert_to_fp16(path, tmp_path / "fp16.onnx", calibration=images)
    fp16 = onnx.load(str(result.path))
    assert any(t.data_type == TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # keep_io_types
    assert read_metadata(result.path)["family"] == family
    assert "LayerNormalization" in result.blocked_ops and "Softmax" in result.blocked_ops
    inputs = make_input_sets(images, (1, 3, 7))
    emulated = strict_fp16_emulation(path, result.path, tmp_path / "emulated.onnx")
    for candidate in (result.path, emulated):
        parity = compare(TorchRunner(model), OnnxRuntimeRunner(candidate), inputs, FP16)
        assert parity.passed, parity.overall.failures
        assert parity.overall.max_abs > 1e-6  # it really rounds to half precision
    assert check_tensorrt_readiness(result.path).ok


class _LargeActivations(torch.nn.Module):
    """Inner activations of ~1e5 (beyond FP16's 65504) scaled back down: FP16 must keep those nodes in FP32."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(3 * 8 * 8, 16)
        self.down = torch.nn.Linear(16, 4)
        with torch.no_grad():
            self.up.weight.mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x.flatten(1)) * 1e-5)


def test_fp16_keeps_large_magnitude_nodes_in_fp32(tmp_path):
    model = _LargeActivations().eval()
    path = export_onnx(model, tmp_path / "big.onnx", input_size=(3, 8, 8))
    images = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    inner = model.up(torch.from_numpy(images).flatten(1)).abs().max().item()
    assert inner > 65504, "the test needs activations beyond FP16's range"
    inputs = {"b8": images}
    # Without calibration only op types are blocked: the strict emulation shows the overflow a GPU would have.
    naive = convert_to_fp16(path, tmp_path / "naive.onnx")
    naive_emulated = strict_fp16_emulation(path, naive.path, tmp_path / "naive_emulated.onnx")
    failed = compare(TorchRunner(model), OnnxRuntimeRunner(naive_emulated), inputs, FP16)
    assert not failed.passed and not failed.overall.finite
    guarded = convert_to_fp16(path, tmp_path / "guarded.onnx", calibration=images)
    assert guarded.blocked_nodes and guarded.calibration_max_abs > 65504
    guarded_emulated = strict_fp16_emulation(path, guarded.path, tmp_path / "guarded_emulated.onnx")
    for candidate in (guarded.path, guarded_emulated):
        result = compare(TorchRunner(model), OnnxRuntimeRunner(candidate), inputs, FP16)
        assert result.passed, result.overall.failures


def test_simplify_keeps_function_and_metadata(exported, tmp_path):
    model, path = exported["swin"]
    result = simplify_onnx(path, tmp_path / "slim.onnx")
    assert result.applied, result.reason
    assert result.nodes_after < result.nodes_before
    assert read_metadata(tmp_path / "slim.onnx") == read_metadata(path)
    inputs = make_input_sets(real_images(64), (1, 3))
    assert compare(TorchRunner(model), OnnxRuntimeRunner(tmp_path / "slim.onnx"), inputs, ONNX_FP32).passed


def test_simplify_without_onnxslim_is_skipped_with_a_reason(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxslim", None)  # makes `import onnxslim` raise ImportError
    result = simplify_onnx(exported["vit"][1], tmp_path / "slim.onnx")
    assert not result.applied and "not installed" in result.reason
    assert not (tmp_path / "slim.onnx").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_exports_are_tensorrt_ready(exported, family):
    report = check_tensorrt_readiness(exported[family][1])
    assert report.ok, report.problems
    assert report.tensorrt_version == supported_ops()["tensorrt_version"]
    assert "operators.md" in report.source


def _graph_model(nodes, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "crafted", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_readiness_names_an_unsupported_op(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _graph_model([helper.make_node("Unique", ["x"], ["y"], name="dedupe")], [x], [y])
    onnx.save(model, tmp_path / "unique.onnx")
    report = check_tensorrt_readiness(tmp_path / "unique.onnx")
    assert not report.ok
    assert any("Unique" in p and "dedupe" in p for p in report.problems)


def test_readiness_names_a_dynamic_spatial_dim(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "height", 32])
    onnx.save(_graph_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y]), tmp_path / "dyn.onnx")
    report = check_tensorrt_readiness(tmp_path / "dyn.onnx")
    assert not report.ok
    assert any("input 'x' axis 2" in p and "height" in p for p in report.problems)
    assert not any("axis 0" in p for p in report.problems)  # the batch axis may be dynamic


def test_readiness_flags_custom_domains_dtypes_and_opset(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    custom = helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft", name="fused")
    model = _graph_model([custom], [x], [y])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, tmp_path / "custom.onnx")
    assert any("com.microsoft" in p for p in check_tensorrt_readiness(tmp_path / "custom.onnx").problems)

    s = helper.make_tensor_value_info("s", TensorProto.UINT16, ["batch", 8])
    t = helper.make_tensor_value_info("t", TensorProto.UINT16, ["batch", 8])
    onnx.save(_graph_model([helper.make_node("Relu", ["s"], ["t"])], [s], [t]), tmp_path / "u16.onnx")
    assert any("UINT16" in p for p in check_tensorrt_readiness(tmp_path / "u16.onnx").problems)

    onnx.save(_graph_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=7), tmp_path / "old.onnx")
    assert any("opset 7" in p for p in check_tensorrt_readiness(tmp_path / "old.onnx").problems)


def test_operator_list_is_data_with_its_source():
    ops = supported_ops()
    assert ops["source"].startswith("https://github.com/onnx/onnx-tensorrt")
    assert ops["operators"]["LayerNormalization"]["supported"]
    assert not ops["operators"]["Unique"]["supported"]
