"""Parity comparator, runners and the TensorRT backend (which must skip, not pass, where TensorRT is absent)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny, photo_crops
from rich.console import Console

from peftx.errors import BackendUnavailableError, UsageError
from peftx.exports.onnx_export import export_onnx
from peftx.exports.parity import ParityReport, compare, error_stats, make_input_sets, reference_outputs
from peftx.exports.runners import OnnxRuntimeRunner, TorchRunner
from peftx.exports.tensorrt import TensorRTRunner, build_engine, resolve_mode, tensorrt_available, unavailable_reason
from peftx.tolerances import FP16, MERGE_FP32, ONNX_FP32, TENSORRT_FP32

SIZE = 32


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """8 crops of sklearn's sample photos, through timm's eval transform."""
    from timm.data import create_transform

    transform = create_transform(
        input_size=(3, SIZE, SIZE), interpolation="bicubic", crop_pct=0.9, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
    return photo_crops(transform).numpy()


@pytest.fixture(scope="module")
def inputs(images) -> dict[str, np.ndarray]:
    return make_input_sets(images, (1, 3, 7))


class _Fixed:
    """A runner returning a fixed transform of the reference model's output (to craft candidates)."""

    def __init__(self, model: torch.nn.Module, transform, name: str = "crafted"):
        self.model, self.transform, self.name, self.calls = model, transform, name, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        with torch.no_grad():
            return self.transform(self.model(torch.from_numpy(batch)).numpy())


def test_input_sets_are_named_real_images_and_noise(images):
    sets = make_input_sets(images, (7, 1, 3, 16), random_batch=3)
    assert list(sets) == ["real_b1", "real_b3", "real_b7", "real_b16", "random_b3"]
    assert np.array_equal(sets["real_b7"], images[:7])
    assert np.array_equal(sets["real_b16"][8:], images)  # fewer images than the batch: cycled
    assert sets["random_b3"].shape == (3, 3, SIZE, SIZE) and sets["random_b3"].dtype == np.float32


def test_identical_models_pass_with_zero_error(inputs):
    model = make_tiny("vit")
    result = compare(TorchRunner(model), TorchRunner(copy.deepcopy(model), name="copy"), inputs, MERGE_FP32)
    assert result.passed and result.overall.max_abs == 0.0 and result.overall.would_pass_atol == 0.0
    assert set(result.sets) == set(inputs) and result.overall.samples == sum(len(b) for b in inputs.values())
    assert result.overall.top1_agreement == 1.0 and result.overall.min_cosine == pytest.approx(1.0)


def test_one_perturbed_weight_fails_parity(inputs, tmp_path):
    model = make_tiny("vit")
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.blocks[1].mlp.fc2.weight[0, 0] += 0.5
    x = torch.from_numpy(inputs["real_b7"])
    with torch.no_grad():
        change = (perturbed(x) - model(x)).abs().max().item()
    assert change > 100 * ONNX_FP32.atol, "the perturbation must change the outputs, or the test proves nothing"

    exported = export_onnx(perturbed, tmp_path / "p.onnx", input_size=(3, SIZE, SIZE))
    for runner, tolerance in (
        (TorchRunner(perturbed, name="merged"), MERGE_FP32),
        (OnnxRuntimeRunner(exported), ONNX_FP32),
    ):
        result = compare(TorchRunner(model), runner, inputs, tolerance)
        assert not result.passed
        assert any("max |Δ|" in f for f in result.overall.failures)
        assert result.overall.would_pass_atol > tolerance.atol
        assert result.overall.max_abs == pytest.approx(change, rel=0.5)


def test_reference_outputs_are_computed_once_and_reused(inputs):
    model = make_tiny("vit")
    reference = _Fixed(model, lambda y: y, name="reference")
    expected = reference_outputs(reference, inputs)
    assert reference.calls == len(inputs)
    for scale in (1.0, 1.0 + 1e-7):
        result = compare(expected, _Fixed(model, lambda y, s=scale: y * s), inputs, ONNX_FP32)
        assert result.passed and result.reference == "reference"
    assert reference.calls == len(inputs)


def test_top1_flip_fails_even_within_atol():
    expected = np.array([[1.0, 0.99999, 0.0]], dtype=np.float32)
    actual = np.array([[0.99999, 1.0, 0.0]], dtype=np.float32)
    stats = error_stats(expected, actual, ONNX_FP32)
    assert stats.max_abs <= stats.bound
    assert not stats.passed and stats.failures == ["top-1 agreement 0.000 < 1.0"]


def test_non_finite_and_wrongly_shaped_outputs_fail(inputs):
    model = make_tiny("vit")
    nan = compare(TorchRunner(model), _Fixed(model, lambda y: np.where(y > 0, np.nan, y)), inputs, FP16)
    assert not nan.passed and not nan.overall.finite
    assert any("non-finite" in f for f in nan.overall.failures)
    text = json.dumps(nan.to_json(), allow_nan=False)  # NaN is written as a string, the JSON stays valid
    assert '"nan"' in text
    wrong = compare(TorchRunner(model), _Fixed(model, lambda y: y[:, :3]), inputs, FP16)
    assert not wrong.passed and any("shape" in f for f in wrong.overall.failures)


def test_report_json_and_rich_table(inputs):
    model = make_tiny("vit")
    good = compare(TorchRunner(model), TorchRunner(copy.deepcopy(model), name="merged"), inputs, MERGE_FP32)
    bad = compare(TorchRunner(model), _Fixed(model, lambda y: y + 1.0, name="shifted"), inputs, ONNX_FP32)
    advisory = compare(
        TorchRunner(model), _Fixed(model, lambda y: y + 1.0, name="advisory"), inputs, FP16, required=False
    )
    report = ParityReport([good, bad, advisory], notes=["test"])
    assert not report.passed and [r.candidate for r in report.failed] == ["shifted"]
    assert ParityReport([good, advisory]).passed  # an advisory failure does not fail the report
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    shifted = data["results"][1]
    assert shifted["tolerance"]["name"] == "onnxruntime_fp32" and shifted["tolerance"]["reason"]
    assert shifted["overall"]["would_pass_atol"] == pytest.approx(1.0, abs=1e-6)
    assert set(shifted["sets"]) == set(inputs)
    console = Console(record=True, width=220)
    console.print(report.table())
    text = console.export_text()
    for expected in ("merged", "shifted", "FAIL", "fail (advisory)", "parity.json"):  # per input set: in the JSON
        assert expected in text


def test_torch_runner_refuses_training_mode():
    with pytest.raises(UsageError, match="training mode"):
        TorchRunner(make_tiny("vit").train())


def test_every_runner_keeps_the_contract_the_comparator_relies_on(images, tmp_path):
    """Runner (runners.py) promises: any float batch in, FP32 [n, classes] out, the same numbers whatever the input's
    dtype or memory layout, resources released on exit. A runner that passed float64 through, returned float64, or
    mis-read a strided batch would break every comparison silently; each of those fails here."""
    model = make_tiny("vit")
    onnx_path = export_onnx(model, tmp_path / "m.onnx", input_size=(3, SIZE, SIZE))
    batch = np.ascontiguousarray(images[:3], dtype=np.float32)
    awkward = np.asfortranarray(batch.astype(np.float64))  # float64 and not C-contiguous
    assert not awkward.flags["C_CONTIGUOUS"] and awkward.dtype == np.float64
    outputs = {}
    for runner in (TorchRunner(model, name="torch"), OnnxRuntimeRunner(onnx_path, name="ort")):
        with runner:
            plain, odd = runner.infer(batch), runner.infer(awkward)
        assert plain.dtype == np.float32 and plain.shape == (3, 5), runner.name
        np.testing.assert_array_equal(plain, odd)
        outputs[runner.name] = plain
    assert np.abs(outputs["torch"] - outputs["ort"]).max() < ONNX_FP32.atol
    assert runner._session is None, "the ONNX Runtime session is dropped when the `with` block ends"


# --- TensorRT: real code where TensorRT and a GPU exist; honest skips elsewhere --------------------------------


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is usable here")
def test_missing_tensorrt_is_reported_not_raised_at_import(tmp_path):
    assert unavailable_reason() is not None
    assert resolve_mode("off") == (False, "TensorRT disabled (tensorrt='off')")
    used, message = resolve_mode("auto")
    assert not used and "skipped" in message
    with pytest.raises(BackendUnavailableError):
        resolve_mode("on")
    with pytest.raises(BackendUnavailableError):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")
    with pytest.raises(BackendUnavailableError), TensorRTRunner(tmp_path / "m.engine"):
        pass


@pytest.fixture(scope="module")
def trt_ready():
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_reference(trt_ready, precision, inputs, tmp_path):
    from peftx.exports.fp16 import convert_to_fp16

    model = make_tiny("vit")
    onnx_path = export_onnx(model, tmp_path / "m.onnx", input_size=(3, SIZE, SIZE))
    fp16_path = convert_to_fp16(onnx_path, tmp_path / "m16.onnx", calibration=inputs["real_b7"]).path
    build = build_engine(
        onnx_path,
        tmp_path / "m.engine",
        batch=(1, 4, 8),
        precision=precision,
        timing_cache_path=tmp_path / "timing.cache",
        workspace_gb=1.0,
        fp16_onnx_path=fp16_path,
    )
    assert build.path.stat().st_size > 0 and (tmp_path / "timing.cache").exists()
    tolerance = FP16 if precision == "fp16" else TENSORRT_FP32
    result = compare(TorchRunner(model), TensorRTRunner(build.path), inputs, tolerance)
    assert result.passed, result.overall.failures
    with TensorRTRunner(build.path) as runner, pytest.raises(UsageError, match="profile"):
        runner.infer(np.zeros((9, 3, SIZE, SIZE), np.float32))


def test_the_merge_bound_comes_from_measured_fp32_noise_and_catches_a_wrong_fold():
    """merge-export's merged-vs-unmerged bound is 8 x the unmerged model's own FP32 noise (its FP32 outputs against
    its float64 evaluation on the same inputs) plus 1e-6 of the scale: a correct RLRR merge passes on this
    processor, and a fold whose SSF shift is off by 1e-3, or which drops one SSF scale, fails."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny, perturb_adapter, real_batch

    from peftx.adapter import adapt, merge_and_unload
    from peftx.exports.parity import float64_outputs, fp32_noise
    from peftx.methods import make_config
    from peftx.tolerances import MERGE_FP32_MEASURED

    model = adapt(make_tiny("vit"), make_config("rlrr"))
    perturb_adapter(model)
    model.eval()
    inputs = make_input_sets(real_batch("vit", n=8).numpy(), (1, 3, 8))
    expected = reference_outputs(TorchRunner(model), inputs)
    expected64 = float64_outputs(model, inputs)
    assert expected64 is not None and all(v.dtype == np.float64 for v in expected64.values())
    noise = fp32_noise(expected, expected64)
    assert 0 < noise < 1e-4  # FP32 rounding: measurable, and small
    tol = MERGE_FP32_MEASURED.tolerance(noise)
    assert tol.atol == 8 * noise and "measured FP32 noise" in tol.reason
    with torch.no_grad():
        merged = merge_and_unload(copy.deepcopy(model)).eval()
        good = compare(expected, TorchRunner(merged, name="merged"), inputs, tol)
        ssf = model.blocks[1].norm1  # the SSF on LayerNorm outputs that the merge folds into its affine
        shifted = copy.deepcopy(merged)
        shifted.blocks[1].norm1.bias += 1e-3
        unscaled = copy.deepcopy(merged)
        unscaled.blocks[1].norm1.weight.copy_(ssf.base.weight)
        unscaled.blocks[1].norm1.bias.copy_(ssf.base.bias + ssf.ssf_shift)
    assert good.passed, good.overall.failures
    for wrong in (shifted, unscaled):
        result = compare(expected, TorchRunner(wrong, name="wrong fold"), inputs, tol)
        assert not result.passed and result.overall.max_abs > 10 * result.overall.bound
    # the float64 evaluation leaves the model as it was
    assert next(model.parameters()).dtype == torch.float32
