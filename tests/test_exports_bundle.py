"""Deployment bundle: files, hashes, standalone infer.py, atomic replace, failure marking, tamper detection."""

from __future__ import annotations

import ast
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import CROP_DATA_CONFIG, make_tiny, photo_crops, write_tiny_bundle

from peftx.errors import BackendUnavailableError, ExportError, OutputError, ParityError, UsageError
from peftx.exports import bundle as bundle_module
from peftx.exports.accuracy import load_infer_module
from peftx.exports.bundle import (
    DECODING_FILE,
    assemble,
    deepstream_step,
    export_step,
    read_bundle,
    render_build_script,
    validate_bundle,
)
from peftx.exports.tensorrt import tensorrt_available
from peftx.exports.tensorrt_ops import ReadinessReport, TargetReadiness

SIZE = 32
CLASSES = ["cat", "dog", "fox", "owl", "yak"]
DATA_CONFIG = CROP_DATA_CONFIG
PROVENANCE = {"method": "test", "base_model": "vit_tiny_patch16_224", "adapter_sha256": "0" * 64}
BATCH = (1, 4, 16)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    path = tmp_path_factory.mktemp("photos") / "china.jpg"
    Image.fromarray(load_sample_images().images[0]).save(path)
    return path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """8 REAL images: crops of sklearn's sample photos through timm's eval transform."""
    from timm.data import create_transform

    return photo_crops(create_transform(**DATA_CONFIG))


def make_bundle(out: Path, images: torch.Tensor, *, reference=None, **kw):
    options = dict(
        data_config=DATA_CONFIG,
        class_names=CLASSES,
        provenance=PROVENANCE,
        images=images,
        batch=BATCH,
        precision="fp16",
        tensorrt="auto",
        simplify=True,
    )
    return write_tiny_bundle(out, make_tiny("vit") if reference is None else reference, **{**options, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, images):
    """One FP16 bundle (TensorRT auto, so skipped here), shared read-only by the tests below."""
    steps: list[str] = []
    out = tmp_path_factory.mktemp("bundles") / "vit-bundle"
    report = make_bundle(out, images, progress=steps.append)
    return out, report, steps


def copy_of(built, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(built[0], target)
    return target


def test_bundle_has_every_file_and_hashes_match(built):
    out, report, steps = built
    expected = {
        "model.onnx",
        "model_fp16.onnx",
        "metadata.json",
        "parity.json",
        "trt_readiness.json",
        "infer.py",
        "image_decoding.py",
        "device_bench.py",
        "build_engine.sh",
        "reference_set.npz",
        "model_deepstream.onnx",
        "config_infer_primary.txt",
        "labels.txt",
    }
    assert expected <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary directory may remain"
    meta = read_bundle(out)
    assert meta["status"] == "ok" and report.status == "ok"
    # no labelled images here: the reference set is the parity images, with no raw files
    assert set(meta["sha256"]) == {
        "model.onnx",
        "model_fp16.onnx",
        "model_deepstream.onnx",
        "infer.py",
        "image_decoding.py",
        "device_bench.py",
        "build_engine.sh",
        "reference_set.npz",
    }
    for name, digest in meta["sha256"].items():
        assert bundle_module.sha256_file(out / name) == digest
    assert steps[0].startswith("exporting ONNX for trt8.6") and steps[-1].startswith("bundle written")


def test_metadata_carries_preprocessing_classes_and_provenance(built):
    out, report, _ = built
    meta = read_bundle(out)
    assert meta["preprocessing"]["input_size"] == [3, SIZE, SIZE]
    assert meta["preprocessing"]["interpolation"] == "bicubic" and meta["preprocessing"]["crop_pct"] == 0.9
    assert meta["preprocessing"]["crop_mode"] == "center"
    assert meta["class_names"] == CLASSES and meta["num_classes"] == 5 and meta["provenance"] == PROVENANCE
    assert meta["batch"] == {"min": 1, "opt": 4, "max": 16} and meta["precision"] == "fp16"
    assert meta["input"]["name"] == "input" and meta["onnx"]["exporter"] == "torchscript opset 17"
    if not tensorrt_available():
        assert meta["tensorrt"]["used"] is False and "skipped" in meta["tensorrt"]["message"]
        assert meta["artifacts"]["engine"] is None and not (out / "model.engine").exists()
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["class_names"]) == CLASSES
    assert json.loads(props["preprocessing"])["mean"] == list(DATA_CONFIG["mean"])
    assert json.loads(props["provenance"]) == PROVENANCE


def test_parity_covers_every_backend_at_odd_batches(built):
    out, report, _ = built
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] is True
    candidates = {r["candidate"]: r for r in parity["results"]}
    expected = {"merged PyTorch", "onnxruntime fp32", "onnxruntime fp16", "fp16 emulation (strict rounding)"}
    assert expected <= set(candidates)
    for result in candidates.values():
        assert set(result["sets"]) == {"real_b1", "real_b3", "real_b7", "real_b16", "random_b3"}
        assert result["reference"] == "reference (unmerged PyTorch)" and result["passed"]
    assert candidates["onnxruntime fp32"]["overall"]["max_abs"] < 1e-5
    assert candidates["onnxruntime fp16"]["required"] is True  # precision fp16: the FP16 checks count
    readiness = json.loads((out / "trt_readiness.json").read_text())
    assert readiness["ok"] is True and readiness["tensorrt_version"]


def test_infer_py_runs_standalone_without_peftx(built, photo, tmp_path):
    out, _, _ = built
    for name in ("infer.py", "image_decoding.py"):
        tree = ast.parse((out / name).read_text())
        # infer.py's one import of peftx is where no image_decoding.py is beside it: in peftx's own source tree
        fallback = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_load_decoding"]
        inside = {id(n) for f in fallback for n in ast.walk(f)}
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in inside
            for alias in getattr(node, "names", [])
        }
        imported |= {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and id(node) not in inside
        }
        assert "peftx" not in imported, name
    # -I: isolated (no PYTHONPATH, no cwd on sys.path); and peftx is made unimportable in case the venv has it.
    runner = (
        "import runpy, sys; sys.modules['peftx'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", runner, str(out / "infer.py"), str(photo)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 5
    rows = [line.split("\t") for line in lines]
    ranks, probs, labels = [int(r[0]) for r in rows], [float(r[1]) for r in rows], [r[3] for r in rows]
    assert ranks == [1, 2, 3, 4, 5] and sorted(labels) == sorted(CLASSES)
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-3)


def _one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    return lines[0]


def test_image_decoding_ships_beside_infer_py_hashed_and_is_what_it_decodes_with(built, photo, tmp_path):
    """peftx's own image_decoding.py, byte for byte, in the sha256 list; infer.py decodes with that copy, refuses a
    modified one (one line, exit 3), and says in one line when it is missing."""
    from peftx import image_decoding

    out = built[0]
    assert (out / DECODING_FILE).read_bytes() == Path(image_decoding.__file__).read_bytes()
    assert read_bundle(out)["sha256"][DECODING_FILE] == bundle_module.sha256_file(out / DECODING_FILE)
    bundle = copy_of(built, tmp_path)
    changed = (bundle / DECODING_FILE).read_text().replace('DECODE_RULE = "rgb8/1"', 'DECODE_RULE = "rgb8/x"')
    (bundle / DECODING_FILE).write_text(changed)
    assert load_infer_module(bundle / "infer.py").DECODE_RULE == "rgb8/x"  # the copy beside it, not peftx's
    done = subprocess.run(
        [sys.executable, "-I", str(bundle / "infer.py"), str(photo)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3 and _one_line(done) == (
        f"infer.py: {DECODING_FILE} is modified: its sha256 differs from metadata.json — copy it again from the "
        "original bundle, or pass --no-verify if you changed it on purpose"
    )
    (bundle / DECODING_FILE).unlink()
    runner = "import runpy, sys; sys.modules['peftx'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0])"
    done = subprocess.run(
        [sys.executable, "-I", "-c", runner, str(bundle / "infer.py"), str(photo)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3 and _one_line(done).startswith(f"infer.py: {DECODING_FILE} is missing beside")


def test_infer_py_preprocessing_matches_timm(built, photo):
    import importlib.util

    from PIL import Image
    from timm.data import create_transform

    spec = importlib.util.spec_from_file_location("bundle_infer", built[0] / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for cfg in (
        DATA_CONFIG,
        {**DATA_CONFIG, "input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875},
    ):
        ours = module.preprocess(photo, cfg)
        timm_ = create_transform(**cfg)(Image.open(photo).convert("RGB")).numpy()[None]
        np.testing.assert_allclose(ours, timm_, atol=1e-6)


def test_build_script_reads_the_input_name_from_the_graph(built):
    import re

    text = render_build_script(built[0] / "model.onnx", (2, 8, 32), "fp32")
    assert "--minShapes=input:2x3x32x32" in text and "--maxShapes=input:32x3x32x32" in text
    assert not re.findall(r"@[A-Z0-9_]+@", text), "every template placeholder is filled"


def test_existing_bundle_without_force_is_untouched(built, images, monkeypatch):
    out = built[0]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(export_step, "export_onnx", lambda *a, **k: pytest.fail("no work may start"))
    with pytest.raises(OutputError, match="already exists"):
        make_bundle(out, images)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_force_replaces_a_bundle_but_never_a_foreign_directory(built, images, tmp_path):
    out = copy_of(built, tmp_path)
    (out / "stale.txt").write_text("from the old bundle")
    make_bundle(out, images, force=True, precision="fp32", simplify=False)
    assert not (out / "stale.txt").exists() and read_bundle(out)["precision"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temp or old directories left behind
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(OutputError, match="not a peftx bundle"):
        make_bundle(foreign, images, force=True)
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"


def test_failed_parity_writes_a_failed_bundle_then_raises(images, tmp_path):
    reference = make_tiny("vit")
    merged = copy.deepcopy(reference)
    with torch.no_grad():
        merged.blocks[0].attn.proj.weight[3, 5] += 1.0
    with torch.no_grad():
        assert (merged(images) - reference(images)).abs().max() > 1e-3, "the perturbation must change outputs"
    out = tmp_path / "bad"
    with pytest.raises(ParityError, match="merged PyTorch"):
        make_bundle(out, images, reference=reference, merged=merged)
    meta = read_bundle(out)
    assert meta["status"] == "failed" and "merged PyTorch" in meta["parity"]["failed"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] is False
    assert "onnxruntime fp32" in {r["candidate"] for r in parity["results"] if not r["passed"]}


def test_validate_detects_a_tampered_model(built, images, tmp_path):
    out = copy_of(built, tmp_path)
    with open(out / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportError, match=r"model\.onnx \(sha256 differs\)"):
        validate_bundle(out, make_tiny("vit"), images)
    (out / "model_fp16.onnx").unlink()
    with pytest.raises(ExportError, match=r"model_fp16\.onnx \(missing\)"):
        validate_bundle(out, make_tiny("vit"), images)


def test_validate_reruns_parity_and_rewrites_the_report(built, images, tmp_path):
    out = copy_of(built, tmp_path)
    (out / "parity.json").unlink()
    report = validate_bundle(out, make_tiny("vit"), images)
    assert report.passed
    assert json.loads((out / "parity.json").read_text())["passed"] is True
    assert read_bundle(out)["status"] == "ok"
    with pytest.raises(ParityError):
        validate_bundle(out, make_tiny("vit", seed=1), images)  # another model is not this bundle's reference
    assert json.loads((out / "parity.json").read_text())["passed"] is False
    assert read_bundle(out)["status"] == "failed"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is usable here")
def test_tensorrt_on_without_tensorrt_fails_before_writing(images, tmp_path):
    with pytest.raises(BackendUnavailableError):
        make_bundle(tmp_path / "trt", images, tensorrt="on")
    assert list(tmp_path.iterdir()) == []


def _unready(path, **_kw) -> ReadinessReport:
    return ReadinessReport(False, ["Unique node x: op Unique is not supported"], [], {"Unique": 1}, 17, "10.15", "test")


def _unready_files(files, target) -> TargetReadiness:
    return TargetReadiness(target, {name: _unready(path) for name, path in files.items()})


def test_readiness_failure_is_an_export_error_unless_tensorrt_is_off(images, tmp_path, monkeypatch):
    monkeypatch.setattr(export_step, "check_tensorrt_readiness", _unready)  # the early check, and
    monkeypatch.setattr(assemble, "check_target_readiness", _unready_files)  # the check of the shipped files
    monkeypatch.setattr(deepstream_step, "check_target_readiness", _unready_files)
    with pytest.raises(ExportError, match="not TensorRT-ready for trt8.6: op Unique is not supported"):
        make_bundle(tmp_path / "auto", images, tensorrt="auto")
    assert list(tmp_path.iterdir()) == []
    report = make_bundle(tmp_path / "off", images, tensorrt="off", precision="fp32", simplify=False)
    assert report.status == "ok"
    assert any("Unique" in w for w in read_bundle(tmp_path / "off")["warnings"])
    assert json.loads((tmp_path / "off" / "trt_readiness.json").read_text())["ok"] is False
    assert read_bundle(tmp_path / "off")["target"]["ready"] is False
    assert 'READY="0"' in (tmp_path / "off" / "build_engine.sh").read_text()  # the script refuses to build it


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"precision": "int8"}, "precision"),
        ({"batch": (8, 4, 16)}, "batch"),
        ({"class_names": ["only", "two"]}, "5 outputs but 2 class names"),
        ({"data_config": {k: v for k, v in DATA_CONFIG.items() if k != "std"}}, "std"),
        ({"images": torch.zeros(2, 3, 16, 16)}, "images must be"),
    ],
)
def test_bad_arguments_are_usage_errors(images, tmp_path, bad, match):
    with pytest.raises(UsageError, match=match):
        make_bundle(tmp_path / "x", bad.get("images", images), **{k: v for k, v in bad.items() if k != "images"})
    assert not (tmp_path / "x").exists()


@pytest.mark.tensorrt
def test_tensorrt_bundle_builds_and_checks_an_engine(images, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    report = make_bundle(tmp_path / "trt", images, tensorrt="on")
    engine = tmp_path / "trt" / "model.engine"
    manifest = json.loads((tmp_path / "trt" / "model.engine.json").read_text())
    assert engine.exists() and "model.engine" not in report.sha256  # device-specific: tied by its manifest instead
    assert manifest["engine_sha256"] == bundle_module.sha256_file(engine) and manifest["precision"] == "fp16"
    assert manifest["gpu"]["compute_capability"] and manifest["tensorrt_version"]
    assert any(r.candidate.startswith("tensorrt") and r.passed for r in report.parity.results)
