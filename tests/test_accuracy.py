"""The accuracy gate: every artifact's task accuracy through the SHIPPED infer.py, against the unmerged model.

A real run (a tiny random-init ViT with a trained linear head: the fastest way to a model well above chance here)
trains on an ImageFolder of non-square images — real sklearn digits, each in a random third of a 3:1 canvas, the
issue's case: a centre crop of the shorter side keeps only the middle third. The bundle's own infer.py, run on the
raw test files, must reach ``peftx eval``'s accuracy within 1 point (here: image for image), and a bundle whose
infer.py preprocesses otherwise, or an artifact that classifies otherwise, must fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config, write_tiny_weights
from PIL import Image

import peftx.exports.bundle as bundle_module
from peftx.data import load_splits
from peftx.deploy import accuracy_images, load_reference, merge_export, validate
from peftx.errors import DataError, ParityError
from peftx.evaluate import evaluate
from peftx.exports.accuracy import load_infer_module, measure_accuracy, select
from peftx.exports.bundle import assemble as bundle_assemble
from peftx.exports.runners import OnnxRuntimeRunner, TorchRunner
from peftx.tolerances import ACCURACY_FP32
from peftx.train import train

CLASSES = 4
TEMPLATE = Path(__file__).resolve().parents[1] / "exports" / "templates" / "infer.py"


def write_wide_digit_folder(root: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """ROOT/{train,val,test}/<digit>/<i>.png: each real digit in a random third of a 96x32 canvas."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        start = 0
        for split, n in per_split.items():
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(idx[start : start + n]):
                canvas = np.zeros((8, 24), np.uint8)
                slot = int(rng.integers(0, 3))
                canvas[:, 8 * slot : 8 * slot + 8] = np.clip(np.rint(digits.images[i] * 255 / 16), 0, 255)
                image = Image.fromarray(canvas).convert("RGB").resize((96, 32), Image.Resampling.BILINEAR)
                image.save(root / split / str(c) / f"{j}.png")
            start += n
    return root


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """(run directory, data folder, peftx eval's test result) of a linear probe trained on the wide digits."""
    tmp = tmp_path_factory.mktemp("wide")
    folder = write_wide_digit_folder(tmp / "data", {"train": 24, "val": 8, "test": 12})
    weights = write_tiny_weights(tmp / "tiny.safetensors")
    run = tmp / "run"
    train(tiny_config(weights, run, data=str(folder), method="linear", epochs=8, lr=5e-2))
    result = evaluate(run, split="test")
    assert result["n"] == 48 and result["accuracy"] >= 0.4  # chance is 0.25: a model whose errors mean something
    return run, folder, result


def _infer_top1(bundle: Path, files: list[Path], *extra: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-I", str(bundle / "infer.py"), *map(str, files), "--top", "1", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if not line.startswith("# ")]
    assert len(rows) == len(files)
    return [row.split("\t")[3] for row in rows]


@pytest.mark.slow
def test_infer_py_on_the_raw_test_files_reaches_peftx_eval_accuracy(wide_run, tmp_path):
    run, folder, evaluated = wide_run
    report = merge_export(run, output=tmp_path / "bundle", batch=(1, 4, 8), tensorrt="off")
    accuracy = report.parity.accuracy
    assert report.status == "ok" and accuracy is not None and accuracy.passed
    assert accuracy.images == evaluated["n"] and "test split" in accuracy.source
    assert accuracy.reference_accuracy == pytest.approx(evaluated["accuracy"], abs=1 / 48 + 1e-9)
    assert accuracy.preprocessing.max_abs == 0.0 and accuracy.preprocessing.contract["crop_mode"] == "squash"
    ort = next(r for r in accuracy.results if r.candidate == "onnxruntime fp32")
    assert ort.required and ort.passed and ort.agreement == 1.0 and ort.drop == 0.0
    assert {r.candidate for r in accuracy.results} == {
        "onnxruntime fp32",
        "onnxruntime fp16",
        "fp16 emulation (strict rounding)",
    }

    # The bundle's own infer.py, as a user runs it, on the raw test files.
    splits = load_splits(folder, load_reference(run).data_config)
    files = [path for path, _ in splits.test.samples]
    labels = [splits.class_names[label] for _, label in splits.test.samples]
    predicted = _infer_top1(tmp_path / "bundle", files)
    infer_accuracy = float(np.mean([p == y for p, y in zip(predicted, labels, strict=True)]))
    assert abs(infer_accuracy - evaluated["accuracy"]) <= 0.01

    # ... image for image what the unmerged model predicts on the training-side tensors (peftx eval's inputs)
    model = load_reference(run).model
    with TorchRunner(model) as runner:
        logits = runner.infer(np.stack([splits.test[i][0].numpy() for i in range(len(splits.test))]))
    assert predicted == [splits.class_names[i] for i in logits.argmax(axis=1)]

    parity = json.loads((tmp_path / "bundle" / "parity.json").read_text())
    assert parity["accuracy"]["passed"] and parity["accuracy"]["images"] == 48
    meta = json.loads((tmp_path / "bundle" / "metadata.json").read_text())
    assert meta["accuracy"]["artifacts"]["onnxruntime fp32"]["accuracy"] == ort.accuracy
    assert meta["preprocessing"]["crop_mode"] == "squash" and meta["preprocessing"]["crop_pct"] == 1.0


def test_a_bundle_whose_infer_py_preprocesses_otherwise_fails(wide_run, tmp_path, monkeypatch):
    """The pre-contract infer.py (shorter side resized, centre crop) on a squash-trained run: the gate fails it."""
    run, _, _ = wide_run
    template = TEMPLATE.read_text()
    assert 'mode = cfg.get("crop_mode", "center")' in template
    centre_cropping = template.replace('mode = cfg.get("crop_mode", "center")', 'mode = "center"')
    monkeypatch.setattr(
        bundle_assemble, "_template", lambda name: centre_cropping if name == "infer.py" else template_of(name)
    )
    with pytest.raises(ParityError, match="shipped preprocessing differs from the training transform"):
        merge_export(run, output=tmp_path / "bundle", batch=(1, 4, 8), tensorrt="off", simplify=False)
    meta = json.loads((tmp_path / "bundle" / "metadata.json").read_text())
    parity = json.loads((tmp_path / "bundle" / "parity.json").read_text())
    assert meta["status"] == "failed" and not parity["accuracy"]["passed"]
    assert parity["accuracy"]["preprocessing"]["max_abs"] > 0.1
    assert all(r["passed"] for r in parity["results"] if r["required"])  # logit parity alone cannot see it


_ORIGINAL_TEMPLATE = bundle_module._template


def template_of(name: str) -> str:
    return _ORIGINAL_TEMPLATE(name)


class Permuted:
    """A runner whose classes come out in another order: a real class-order bug, caught by accuracy alone."""

    def __init__(self, inner, name: str):
        self.inner, self.name = inner, name

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        self.inner.__exit__(*exc)

    def infer(self, batch):
        return np.roll(self.inner.infer(batch), 1, axis=1)


def test_an_artifact_that_classifies_otherwise_fails_and_advisory_ones_only_report(wide_run, tmp_path):
    run, _, evaluated = wide_run
    merge_export(run, output=tmp_path / "bundle", batch=(1, 4, 8), tensorrt="off", simplify=False, accuracy_limit=0)
    loaded = load_reference(run)
    labelled, why_not = accuracy_images(loaded)
    assert why_not is None and len(labelled) == 48
    onnx = tmp_path / "bundle" / "model.onnx"
    meta = json.loads((tmp_path / "bundle" / "metadata.json").read_text())
    report = measure_accuracy(
        TorchRunner(loaded.model, name="unmerged PyTorch"),
        [
            (OnnxRuntimeRunner(onnx, name="good"), ACCURACY_FP32, True),
            (Permuted(OnnxRuntimeRunner(onnx), name="permuted"), ACCURACY_FP32, True),
            (Permuted(OnnxRuntimeRunner(onnx), name="permuted advisory"), ACCURACY_FP32, False),
        ],
        labelled,
        meta["preprocessing"],
        tmp_path / "bundle" / "infer.py",
        batch=(1, 8),
    )
    good, bad, advisory = report.results
    assert report.reference_accuracy == pytest.approx(evaluated["accuracy"], abs=1 / 48 + 1e-9)
    assert good.passed and good.drop == 0.0 and good.agreement == 1.0
    assert not bad.passed and bad.drop > bad.bound and bad.agreement == 0.0
    assert "points below the unmerged model's" in bad.failures[0]
    assert not advisory.passed and not advisory.required
    assert not report.passed and report.failures() == [f"permuted: {bad.failures[0]}"]
    text = json.dumps(report.to_json())  # JSON-ready, as parity.json stores it
    assert json.loads(text)["results"][1]["passed"] is False


def test_validate_measures_a_labelled_images_folder_and_a_subset(wide_run, tmp_path):
    run, folder, _ = wide_run
    merge_export(run, output=tmp_path / "bundle", batch=(1, 4, 8), tensorrt="off", simplify=False, accuracy_limit=10)
    meta = json.loads((tmp_path / "bundle" / "metadata.json").read_text())
    assert meta["accuracy"]["images"] == 10 and "10 of 48 images" in meta["accuracy"]["source"]
    report = validate(tmp_path / "bundle", images_dir=folder, tensorrt="off", accuracy_limit=None)
    assert report.passed and report.accuracy.images == 48
    assert report.accuracy.source.startswith(f"labelled images in {folder}")
    assert json.loads((tmp_path / "bundle" / "metadata.json").read_text())["accuracy"]["images"] == 48
    unlabelled = tmp_path / "photos"
    unlabelled.mkdir()
    Image.open(next((folder / "test" / "0").iterdir())).save(unlabelled / "x.png")
    report = validate(tmp_path / "bundle", images_dir=unlabelled, tensorrt="off", accuracy_limit=5)
    assert report.accuracy.images == 5 and "test split" in report.accuracy.source  # accuracy: the run's own data
    stray = tmp_path / "stray"
    (stray / "0").mkdir(parents=True)
    (stray / "zebra").mkdir()
    Image.open(next((folder / "test" / "0").iterdir())).save(stray / "0" / "x.png")
    with pytest.raises(DataError, match="zebra is not a training class"):
        validate(tmp_path / "bundle", images_dir=stray, tensorrt="off")


def test_select_is_seeded_and_in_dataset_order():
    first, again = select(list(range(100)), "x", 10), select(list(range(100)), "x", 10)
    assert first.indices == again.indices == sorted(first.indices) and len(set(first.indices)) == 10
    assert select(list(range(5)), "x", 10).indices == [0, 1, 2, 3, 4]
    assert select(list(range(100)), "x", 10, seed=1).indices != first.indices


def test_infer_py_precision_picks_the_artifact(wide_run, tmp_path):
    run, folder, _ = wide_run
    merge_export(
        run,
        output=tmp_path / "bundle",
        batch=(1, 4, 8),
        tensorrt="off",
        simplify=False,
        precision="fp16",
        accuracy_limit=0,
    )
    files = sorted((folder / "test" / "1").iterdir())[:4]
    bundle = tmp_path / "bundle"
    for precision, artifact in (("fp32", "model.onnx"), ("fp16", "model_fp16.onnx")):
        done = subprocess.run(
            [sys.executable, "-I", str(bundle / "infer.py"), str(files[0]), "--precision", precision],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and f"backend: onnxruntime ({artifact}, {precision})" in done.stderr
    default = subprocess.run(
        [sys.executable, "-I", str(bundle / "infer.py"), str(files[0])], capture_output=True, text=True, timeout=120
    )
    assert "(model_fp16.onnx, fp16)" in default.stderr  # an fp16 bundle runs its FP16 model by default
    assert _infer_top1(bundle, files, "--precision", "fp16") == _infer_top1(bundle, files, "--precision", "fp32")
    missing = subprocess.run(
        [sys.executable, "-I", str(bundle / "infer.py"), str(files[0]), "--precision", "int8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and missing.stdout == ""
    assert missing.stderr.strip() == "infer.py: this bundle has no int8 model — choose --precision fp32 or fp16"


def test_infer_py_precision_and_an_engine_of_another_precision(wide_run, tmp_path, monkeypatch):
    """--precision fp16 never runs an engine model.engine.json says is FP32: refused with --backend tensorrt,
    the FP16 ONNX model instead with --backend auto (no TensorRT is needed to check either)."""
    run, _, _ = wide_run
    bundle = tmp_path / "bundle"
    merge_export(run, output=bundle, batch=(1, 4, 8), tensorrt="off", simplify=False, accuracy_limit=0)
    (bundle / "model.engine").write_bytes(b"not a real engine: TensorRT cannot exist here")
    (bundle / "model.engine.json").write_text(
        json.dumps({"format": "peftx-engine-manifest", "precision": "fp32", "engine": "model.engine"})
    )
    infer = load_infer_module(bundle / "infer.py")
    meta = json.loads((bundle / "metadata.json").read_text())
    monkeypatch.setattr(infer, "tensorrt_usable", lambda: True)  # as on a device with TensorRT and cuda-python
    monkeypatch.setattr(infer, "TensorRTBackend", lambda path: pytest.fail("the FP32 engine must not be loaded"))
    with pytest.raises(SystemExit) as info:
        infer.pick_backend("tensorrt", meta, precision="fp16")
    assert str(info.value.code) == (
        "infer.py: model.engine was built at fp32, not fp16 — rebuild it with "
        "./build_engine.sh fp16, or use --backend onnx"
    )
    backend = infer.pick_backend("auto", meta, precision="fp16")
    assert backend.name == "onnxruntime (model_fp16.onnx, fp16)"
