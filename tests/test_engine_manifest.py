"""Engine manifests: an engine built for another GPU or TensorRT is refused with one line, by infer.py and validate.

The comparison (``engine_problems``, in the bundle's infer.py, which peftx imports) is pure: it is tested directly on
a table of manifests and machine facts. Its two users are tested with FAKED machine facts, since no TensorRT or GPU
exists here: infer.py's ``pick_backend`` / ``check_engine`` and peftx's ``validate_bundle``. Both must refuse before
TensorRT would ever be asked to deserialize the engine. The last test builds a real engine and skips without
TensorRT.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, real_batch, write_tiny_bundle

from peftx.errors import ExportError
from peftx.exports import tensorrt as trt_module
from peftx.exports.bundle import artifacts as bundle_artifacts
from peftx.exports.bundle import read_bundle, validate_bundle
from peftx.exports.templates.infer import (
    _release,
    engine_problems,
    jetson_facts,
    parse_l4t,
    refusal_line,
    release_string,
)
from peftx.exports.tensorrt import TensorRTProbe, check_engine_for_machine
from peftx.fsutil import sha256_file

ORIN = {
    "tensorrt_version": "10.3.0",
    "gpu": {"name": "Orin", "compute_capability": "8.7"},
    "jetson": {"model": "NVIDIA Jetson AGX Orin", "l4t": "36.4.0"},
}
MANIFEST = {
    "format": "peftx-engine-manifest",
    "format_version": 1,
    "engine": "model.engine",
    "engine_sha256": "e" * 64,
    **ORIN,
    "precision": "fp16",
    "batch": {"min": 1, "opt": 4, "max": 8},
    "source_onnx": "model.onnx",
    "source_onnx_sha256": "o" * 64,
    "target": "trt10",
}


def here(**changes) -> dict:
    facts = copy.deepcopy(ORIN)
    facts["sha256"] = {"model.engine": "e" * 64, "model.onnx": "o" * 64}
    for key, value in changes.items():
        facts[key] = value
    return facts


@pytest.mark.parametrize(
    "facts, refused, warned",
    [
        (here(), [], []),
        (here(tensorrt_version="10.3.0.26"), [], []),  # the build number does not matter, major.minor.patch does
        (here(tensorrt_version="10.3"), [], []),  # 10.3 is 10.3.0 (TRT_VERSION=10.3 once wrote "10.3")
        (here(tensorrt_version="10.3.1"), ["TensorRT 10.3.0 built it, this machine has 10.3.1"], []),
        (here(tensorrt_version="8.6.2"), ["TensorRT 10.3.0 built it, this machine has 8.6.2"], []),
        (here(tensorrt_version="10.4.0"), ["TensorRT 10.3.0 built it"], []),
        (here(tensorrt_version=None), ["TensorRT is not installed here"], []),
        (
            here(gpu={"name": "Xavier", "compute_capability": "7.2"}),
            ["compute capability 8.7 (Orin), this GPU is 7.2"],
            [],
        ),
        (here(gpu={"name": "Orin NX", "compute_capability": "8.7"}), [], ["built on Orin, this GPU is Orin NX"]),
        (here(jetson={"model": "x", "l4t": "36.3.0"}), [], ["built on L4T 36.4.0, this Jetson runs L4T 36.3.0"]),
        (here(sha256={"model.engine": "f" * 64, "model.onnx": "o" * 64}), ["model.engine is not the engine"], []),
        (here(sha256={"model.engine": "e" * 64, "model.onnx": "p" * 64}), ["built from another model.onnx"], []),
    ],
)
def test_engine_problems(facts, refused, warned):
    refusals, warnings = engine_problems(MANIFEST, facts)
    assert len(refusals) == len(refused) and all(r in got for r, got in zip(refused, refusals, strict=True))
    assert len(warnings) == len(warned) and all(w in got for w, got in zip(warned, warnings, strict=True))


@pytest.mark.parametrize(
    "version, release, spelled",
    [
        ("10.3", (10, 3, 0), "10.3.0"),
        ("10.3.0", (10, 3, 0), "10.3.0"),
        ("10.3.0.26", (10, 3, 0), "10.3.0.26"),
        ("8.5.2.2", (8, 5, 2), "8.5.2.2"),
        ("11", (11, 0, 0), "11.0.0"),
        (" 10.13.3 ", (10, 13, 3), "10.13.3"),
        ("10.4.0b", (10, 4, 0), "10.4.0"),  # a suffix is not a build number
        (None, (), None),
        ("", (), None),
        ("unknown", (), None),
    ],
)
def test_a_tensorrt_version_is_normalised_to_major_minor_patch(version, release, spelled):
    assert _release(version) == release and release_string(version) == spelled


def test_a_manifest_that_says_10_3_is_accepted_on_the_10_3_0_that_built_it():
    """The case of issue 20: TRT_VERSION=10.3 wrote "10.3", and the TensorRT 10.3.0.26 that built it refused it."""
    old = {**MANIFEST, "tensorrt_version": "10.3"}
    assert engine_problems(old, here(tensorrt_version="10.3.0.26")) == ([], [])
    assert engine_problems(old, here(tensorrt_version="10.4.0.26"))[0]  # another release is still refused


def test_the_python_builders_manifest_spells_the_version_in_full(tmp_path):
    engine, onnx_file = tmp_path / "model.engine", tmp_path / "model.onnx"
    engine.write_bytes(b"engine"), onnx_file.write_bytes(b"onnx")
    build = trt_module.EngineBuild(engine, onnx_file, "fp16", "10.3", (1, 4, 8), 1.0)
    manifest = trt_module.write_manifest(build, {**ORIN, "tensorrt_version": "10.3"}, built_by="test")
    assert manifest["tensorrt_version"] == "10.3.0"
    assert json.loads((tmp_path / "model.engine.json").read_text())["tensorrt_version"] == "10.3.0"


def test_a_manifest_without_gpu_facts_warns_instead_of_refusing():
    refusals, warnings = engine_problems({**MANIFEST, "gpu": {"name": None, "compute_capability": None}}, here())
    assert refusals == [] and "cannot be checked" in warnings[0]


def test_the_refusal_is_one_line_with_both_machines_and_the_fix():
    facts = here(tensorrt_version="8.6.2", gpu={"name": "Xavier", "compute_capability": "7.2"})
    line = refusal_line(MANIFEST, facts, engine_problems(MANIFEST, facts)[0])
    assert "\n" not in line
    assert "TensorRT 10.3.0 on Orin (compute capability 8.7), L4T 36.4.0" in line
    assert "TensorRT 8.6.2 on Xavier (compute capability 7.2)" in line and line.endswith("./build_engine.sh")


def test_l4t_and_jetson_model_are_read_from_the_files_a_jetson_has(tmp_path):
    assert (
        parse_l4t("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: x") == "36.4.3"
    )
    assert parse_l4t("") is None and parse_l4t("garbage") is None
    assert jetson_facts(tmp_path) is None  # not a Jetson
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref\n")
    assert jetson_facts(tmp_path) == {"model": None, "l4t": "35.5.0"}


# --- infer.py's use ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "b"
    write_tiny_bundle(out, make_tiny("vit", seed=6))
    return out


def with_engine(bundle: Path, tmp: Path, **manifest_changes) -> Path:
    """A copy of the bundle with an engine file (bytes no TensorRT would load) and its manifest."""
    out = shutil.copytree(bundle, tmp / "with-engine")
    (out / "model.engine").write_bytes(b"not a real engine: TensorRT cannot exist here")
    manifest = {
        **MANIFEST,
        "engine_sha256": sha256_file(out / "model.engine"),
        "source_onnx_sha256": sha256_file(out / "model.onnx"),
        **manifest_changes,
    }
    (out / "model.engine.json").write_text(json.dumps(manifest))
    return out


def load_infer(bundle: Path):
    spec = importlib.util.spec_from_file_location(f"infer_{id(bundle)}", bundle / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_infer_refuses_an_engine_built_for_another_gpu(bundle, tmp_path, monkeypatch):
    out = with_engine(bundle, tmp_path)
    infer = load_infer(out)
    monkeypatch.setattr(infer, "tensorrt_usable", lambda: True)  # as on a device with TensorRT and cuda-python
    monkeypatch.setattr(infer, "TensorRTBackend", lambda path: pytest.fail("the engine must not be loaded"))
    xavier = dict(here(tensorrt_version="8.5.2.2", gpu={"name": "Xavier", "compute_capability": "7.2"}))
    with pytest.raises(SystemExit) as info:
        infer.pick_backend("tensorrt", read_bundle(out), facts=lambda: xavier)
    message = str(info.value.code)
    assert message.startswith("infer.py: model.engine was built for TensorRT 10.3.0 on Orin") and "\n" not in message
    assert "this machine has TensorRT 8.5.2.2 on Xavier" in message and "./build_engine.sh" in message


def test_infer_accepts_an_engine_built_here_and_warns_without_a_manifest(bundle, tmp_path, capsys):
    out = with_engine(bundle, tmp_path)
    infer = load_infer(out)
    infer.check_engine(out / "model.engine", facts=lambda: copy.deepcopy(ORIN))  # returns: nothing to refuse
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes() + b"\0")  # another model.onnx now
    with pytest.raises(SystemExit, match="built from another model.onnx"):
        infer.check_engine(out / "model.engine", facts=lambda: copy.deepcopy(ORIN))
    (out / "model.engine.json").unlink()
    infer.check_engine(out / "model.engine", facts=lambda: copy.deepcopy(ORIN))
    assert "no model.engine.json" in capsys.readouterr().err


def test_infer_without_tensorrt_says_what_to_install(bundle, tmp_path):
    out = with_engine(bundle, tmp_path)
    photo = tmp_path / "photo.png"
    from PIL import Image
    from sklearn.datasets import load_sample_images

    Image.fromarray(load_sample_images().images[1]).save(photo)
    done = subprocess.run(
        [sys.executable, "-I", str(out / "infer.py"), str(photo), "--backend", "tensorrt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "tensorrt" in sys.modules or importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is importable here")
    assert done.returncode != 0 and done.stdout == ""
    line = done.stderr.strip()
    assert line.startswith("infer.py: --backend tensorrt needs the tensorrt and cuda-python packages and a GPU — ")
    assert "TensorRT's Python package is not importable" in line and line.endswith("; or use --backend onnx")
    auto = subprocess.run(
        [sys.executable, "-I", str(out / "infer.py"), str(photo)], capture_output=True, text=True, timeout=120
    )
    assert auto.returncode == 0 and "backend: onnxruntime" in auto.stderr  # auto falls back to the ONNX model


def _fake_cuda_python(monkeypatch, layout: str) -> types.ModuleType:
    """The module layout of a cuda-python release (no CUDA exists here): 11.8 has ``cuda.cudart`` only, 13 has
    ``cuda.bindings.runtime`` only (cuda.cudart was removed); returns the runtime module."""
    runtime, cuda = types.ModuleType("runtime"), types.ModuleType("cuda")
    runtime.cudaGetDeviceCount = lambda: (0, 1)
    if layout == "11.8":
        cuda.cudart = runtime
        monkeypatch.setitem(sys.modules, "cuda.cudart", runtime)
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    else:
        bindings = types.ModuleType("cuda.bindings")
        bindings.runtime, cuda.bindings = runtime, bindings
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
        monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    return runtime


@pytest.mark.parametrize("layout", ["11.8", "13"])
def test_cudart_is_found_in_the_layout_of_each_cuda_python(bundle, monkeypatch, layout):
    infer = load_infer(bundle)
    runtime = _fake_cuda_python(monkeypatch, layout)
    assert infer._cudart() is runtime
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert infer.tensorrt_problem() is None and infer.tensorrt_usable()


@pytest.mark.parametrize(
    "l4t, spec",
    [
        ("35.4.1", "pip install 'cuda-python==11.8.*'"),  # JetPack 5.1.2: CUDA 11.4
        ("36.4.3", "pip install 'cuda-python==12.*'"),  # JetPack 6.2: CUDA 12.6
        ("38.2.0", "pip install 'cuda-python==13.*'"),  # JetPack 7: CUDA 13
        (None, "pip install the cuda-python of your CUDA major: 'cuda-python==11.8.*' (CUDA 11), '==12.*' or '==13.*'"),
    ],
)
def test_what_is_missing_for_the_engine_names_the_cuda_python_of_this_jetpack(bundle, monkeypatch, l4t, spec):
    infer = load_infer(bundle)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert "sudo apt install python3-libnvinfer" in infer.tensorrt_problem()
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setattr(infer, "jetson_facts", lambda: {"model": "x", "l4t": l4t} if l4t else None)
    assert infer.tensorrt_problem() == f"cuda-python is not installed ({spec})"
    assert not infer.tensorrt_usable()


@pytest.mark.parametrize("installed, warned", [("10.3.0.26", False), ("10.4.0.26", True)])
def test_check_names_a_tensorrt_other_than_the_one_that_built_the_engine(
    bundle, tmp_path, monkeypatch, installed, warned
):
    out = with_engine(bundle, tmp_path, tensorrt_version="10.3")  # as TRT_VERSION=10.3 once wrote it
    infer = load_infer(out)
    fake = types.ModuleType("tensorrt")
    fake.__version__ = installed
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    lines = infer.environment_lines()
    assert lines[0].startswith("env   Python ") and f"TensorRT {installed}" in lines[0]
    warning = f"warn  model.engine was built with TensorRT 10.3, this machine has {installed}: rebuild it here"
    assert any(line.startswith(warning) for line in lines) == warned, lines


def test_the_infer_py_tensorrt_backend_needs_no_torch(bundle):
    import ast

    tree = ast.parse((bundle / "infer.py").read_text())
    backend = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TensorRTBackend")
    imported = {
        a.name for n in ast.walk(tree) for a in getattr(n, "names", []) if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    assert "torch" not in imported and "tensorrt" in imported
    assert "cudaMalloc" in ast.unparse(backend) and "execute_async_v3" in ast.unparse(backend)


# --- peftx validate's use --------------------------------------------------------------------------------------------


def test_validate_refuses_an_engine_from_another_device_before_writing(bundle, tmp_path, monkeypatch):
    out = with_engine(bundle, tmp_path)
    rtx_4090 = {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}  # as if TensorRT and it were here
    monkeypatch.setattr(trt_module, "ASSUMED", trt_module.AssumedMachine(TensorRTProbe("10.3.0", None), gpu=rtx_4090))
    monkeypatch.setattr(
        bundle_artifacts, "TensorRTRunner", lambda *a, **k: pytest.fail("the engine must not be loaded")
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match=r"model\.engine was built for TensorRT 10\.3\.0 on Orin .* RTX 4090") as info:
        validate_bundle(out, make_tiny("vit", seed=6), real_batch("vit", n=8), tensorrt="auto")
    assert "./build_engine.sh" in info.value.hint and "--tensorrt off" in info.value.hint
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "nothing written when the engine is refused"
    report = validate_bundle(out, make_tiny("vit", seed=6), real_batch("vit", n=8), tensorrt="off")
    assert report.passed  # the same bundle validates without TensorRT: only the engine was refused


def test_check_engine_for_machine_is_the_same_comparison(bundle, tmp_path):
    out = with_engine(bundle, tmp_path)
    assert check_engine_for_machine(out / "model.engine", copy.deepcopy(ORIN)) == []
    with pytest.raises(ExportError, match="compute capability 8.7 .*this GPU is 7.2"):
        check_engine_for_machine(out / "model.engine", {**ORIN, "gpu": {"name": "Xavier", "compute_capability": "7.2"}})
    (out / "model.engine.json").write_text("{not json")
    with pytest.raises(ExportError, match="model.engine.json is unreadable"):
        check_engine_for_machine(out / "model.engine", ORIN)


# --- the Python builder (real TensorRT only; skipped where it cannot exist) -------------------------------------


@pytest.mark.tensorrt
def test_a_real_tensorrt_8_5_target_fp16_build_pins_its_layernorm(tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    report = write_tiny_bundle(
        tmp_path / "b", make_tiny("vit", seed=6), precision="fp16", tensorrt="on", simplify=True, target="jetpack5"
    )
    manifest = json.loads((tmp_path / "b" / "model.engine.json").read_text())
    assert manifest["fp32_layers"] == len(report.fp32_nodes) == 35
    assert any(r.candidate == "tensorrt fp16" and r.passed for r in report.parity.results)
    with pytest.raises(ExportError, match="not in the parsed network"):  # a name the parser did not produce
        trt_module.build_engine(
            tmp_path / "b" / "model.onnx",
            tmp_path / "x.engine",
            batch=(1, 4, 8),
            precision="fp16",
            fp32_layers=["/no/such/node"],
        )
