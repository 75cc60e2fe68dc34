"""Models past protobuf's 2 GB: every ONNX file as graph + ``<graph>.data``, end to end.

A ViT-H/14 (2.5 GB in FP32) cannot run here in a test, so the size at which ``onnx_io.save`` switches to external
data is lowered to 0 for these tests: a tiny model then takes exactly the path a large one takes (export, onnxslim,
FP16 with its calibration probe, INT8 calibration and the strongly typed FP16 float parts, the DeepStream graph,
hashing, validate, the bundle's infer.py and build_engine.sh). The real sizes are measured by
``benchmarks/scaling.py`` (docs/backbones.md).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_tiny, perturb_adapter, real_batch, tiny_data_cfg, write_tiny_bundle

from peftx.data import sample_photos
from peftx.errors import ExportError
from peftx.exports import onnx_io
from peftx.exports.accuracy import select
from peftx.exports.bundle import read_bundle, verify_artifacts
from peftx.exports.onnx_export import export_onnx
from peftx.fsutil import sha256_file

GRAPHS = ("model.onnx", "model_fp16.onnx", "model_int8.onnx", "model_deepstream.onnx")


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture
def external(monkeypatch):
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_MIN_BYTES", 0)


def _export(tmp_path: Path, name: str = "m.onnx") -> tuple[Path, np.ndarray]:
    cfg = tiny_data_cfg("vit")
    path = export_onnx(make_tiny("vit", seed=3).eval(), tmp_path / name, input_size=cfg["input_size"])
    return path, real_batch("vit", n=3).numpy()


def test_export_writes_graph_and_data_file_that_run_as_the_one_file_form(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    one_file, x = _export(tmp_path / "a")
    assert onnx_io.files(one_file) == [one_file]
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_MIN_BYTES", 0)
    (tmp_path / "b").mkdir()
    split, _ = _export(tmp_path / "b")
    data = split.with_name("m.onnx.data")
    assert onnx_io.files(split) == [split, data]
    assert data.stat().st_size > 10 * split.stat().st_size  # the weights left the graph file
    assert not list((tmp_path / "b").glob(".export-*")), "the exporter's staging directory was left behind"
    np.testing.assert_array_equal(_run(split, x), _run(one_file, x))
    onnx_io.check(split)


def test_a_graph_only_rewrite_keeps_the_weights_and_a_small_save_drops_a_stale_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_MIN_BYTES", 0)
    path, x = _export(tmp_path)
    before = _run(path, x)
    graph = onnx_io.load(path, weights=False)
    assert onnx_io.has_external_data(graph)
    graph.producer_version = "rewritten"
    onnx_io.save(graph, path)  # metadata edits never touch the weights
    np.testing.assert_array_equal(_run(path, x), before)
    full = onnx_io.load(path)
    assert not onnx_io.has_external_data(full)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_MIN_BYTES", onnx.checker.MAXIMUM_PROTOBUF)
    onnx_io.save(full, path)
    assert onnx_io.files(path) == [path] and not path.with_name("m.onnx.data").exists()
    np.testing.assert_array_equal(_run(path, x), before)


def test_replace_moves_graph_and_data_together(tmp_path, external):
    path, x = _export(tmp_path, "slim.onnx")
    before = _run(path, x)
    target = tmp_path / "model.onnx"
    onnx_io.replace(path, target)
    assert not path.exists() and not path.with_name("slim.onnx.data").exists()
    assert onnx_io.files(target) == [target, tmp_path / "model.onnx.data"]
    np.testing.assert_array_equal(_run(target, x), before)
    onnx_io.remove(target)
    assert not list(tmp_path.glob("model.onnx*"))


def test_a_missing_data_file_is_named(tmp_path, external):
    path, _ = _export(tmp_path)
    path.with_name("m.onnx.data").unlink()
    with pytest.raises(ExportError, match=r"m\.onnx keeps its weights in m\.onnx\.data, which is missing"):
        onnx_io.load(path)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """An INT8 bundle for TensorRT 11 (FP16 float parts: the most rewrites of any target) with every graph split."""
    from test_int8 import _labelled, _request

    reference = make_tiny("vit", seed=4)
    perturb_adapter(reference)  # a model whose INT8 gate needs the fallback: its graph is replaced, data file too
    out = tmp_path_factory.mktemp("external") / "bundle"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_io, "EXTERNAL_DATA_MIN_BYTES", 0)
        write_tiny_bundle(
            out,
            reference,
            precision="int8",
            simplify=True,
            target="trt11",
            accuracy_set=select(_labelled(reference, "vit", 40, seed=1), "crops", None),
            int8=_request(_labelled(reference, "vit", 32, seed=2)),
        )
    return out


def test_every_shipped_graph_has_its_data_file_hashed_and_recorded(bundle):
    meta = read_bundle(bundle)
    assert meta["status"] == "ok" and meta["int8"]["fallback"]["passed"]
    assert meta["onnx"]["simplify"]["applied"], meta["onnx"]["simplify"]
    for name in GRAPHS:
        data = f"{name}.data"
        assert onnx_io.has_external_data(onnx_io.load(bundle / name, weights=False)), name
        assert meta["external_data"][name] == [data]
        assert meta["sha256"][data] == sha256_file(bundle / data)
    assert sorted(p.name for p in bundle.glob("*.data")) == sorted(f"{n}.data" for n in GRAPHS)
    scratch = [
        *bundle.glob(".probe-*"),
        *bundle.glob(".weights-*"),
        *bundle.glob("*.slim.*"),
        *bundle.glob(".export-*"),
    ]
    assert not scratch, "scratch files shipped"


def test_verification_names_a_changed_or_missing_data_file(bundle, tmp_path):
    copy_dir = tmp_path / "b"
    shutil.copytree(bundle, copy_dir)
    data = copy_dir / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(ExportError, match=r"model\.onnx\.data \(sha256 differs\)"):
        verify_artifacts(copy_dir)
    data.unlink()
    with pytest.raises(ExportError, match=r"model\.onnx\.data \(missing\)"):
        verify_artifacts(copy_dir)


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    sample_photos()[0].convert("RGB").save(path)
    return path


def test_infer_py_runs_checks_and_refuses_without_the_weights(bundle, tmp_path):
    copy_dir = tmp_path / "b"
    shutil.copytree(bundle, copy_dir)
    image = _image(tmp_path)
    infer = [sys.executable, str(copy_dir / "infer.py")]
    for args in ([str(image)], [str(image), "--precision", "int8"], ["--check"]):
        done = subprocess.run([*infer, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    (copy_dir / "model_int8.onnx.data").unlink()  # the default: the bundle's precision
    done = subprocess.run([*infer, str(image)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    line = done.stderr.strip().splitlines()[-1]
    assert "model_int8.onnx is without its weights: model_int8.onnx.data is missing" in line, done.stderr
    assert "Traceback" not in done.stderr


def test_build_engine_sh_refuses_a_graph_without_its_data_file(bundle, tmp_path):
    from test_build_engine import run_script
    from trtexec_stand_in import install

    stand_in = tmp_path / "bin"
    install(stand_in, "11.1")
    code, parsed, err, _ = run_script(bundle, stand_in, tmp_path, "11.1", "int8")
    assert code == 0, err
    assert parsed["options"]["--onnx"] == "model_int8.onnx"
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "model_int8.onnx.data").unlink()
    code, parsed, err, _ = run_script(broken, stand_in, tmp_path, "11.1", "int8")
    assert code != 0 and parsed == {}
    assert "model_int8.onnx keeps its weights in model_int8.onnx.data, which is missing" in err
