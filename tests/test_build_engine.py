"""The bundle's build_engine.sh, run for real against a STAND-IN trtexec.

TensorRT cannot exist on the machines these tests run on (no GPU, and its wheels fetch from a host they cannot
reach), so nothing here builds an engine. The stand-in only does what the script relies on: it prints trtexec's
version banner for --help ("[TensorRT v8502]" on 8.x, "[TensorRT v100300] [b26]" from 10.x on, as
samples/common/logging.h of each NVIDIA/TensorRT release writes it), records the arguments it is given, prints the
"Selected Device" / "Compute Capability" lines of trtexec's device report, and writes a file where --saveEngine
points. What is tested is OUR script: which flags it passes for each TensorRT version, what it refuses, and the
manifest it writes. The flags expected per version come from the target profiles (exports/targets.py), so the
script and the Python side cannot drift apart.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_tiny, real_batch, tiny_data_cfg

from peftx.exports.bundle import read_bundle, write_bundle
from peftx.exports.layernorm import decomposed_layernorms
from peftx.exports.targets import profile_for_tensorrt
from peftx.exports.templates.infer import engine_problems, parse_l4t
from peftx.fsutil import sha256_file

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("sha256sum") is None, reason="build_engine.sh needs bash and coreutils"
)

STAND_IN = r"""#!/usr/bin/env bash
# A stand-in for trtexec (TensorRT cannot be installed here): banner, argument log, device report, engine file.
if [[ "$1" == --help ]]; then
  echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${STUB_CODE}]${STUB_BUILD} # trtexec --help"; exit 0
fi
printf '%s\n' "$@" > "$STUB_ARGS"
echo "[12/01/2026-10:00:00] [I] Selected Device: ${STUB_GPU:-NVIDIA Jetson Orin}"
echo "[12/01/2026-10:00:00] [I] Compute Capability: ${STUB_CC:-8.7}"
[[ -n "${STUB_FAIL:-}" ]] && { echo "[E] Error[4]: parsing failed" >&2; exit 1; }
for a in "$@"; do case "$a" in --saveEngine=*) echo "engine built by the stand-in" > "${a#--saveEngine=}" ;; esac; done
"""
# (banner code, build suffix, version the script must read): how each release line prints itself.
VERSIONS = {
    "8.5": ("8502", "", "8.5.2"),
    "8.6": ("8602", "", "8.6.2"),
    "10.3": ("100300", " [b26]", "10.3.0"),
    "10.13": ("101300", " [b12]", "10.13.0"),
    "11.4": ("110400", " [b3]", "11.4.0"),
}


def _bundle(out: Path, target: str | None) -> Path:
    reference = make_tiny("vit", seed=4)
    cfg = tiny_data_cfg("vit")
    write_bundle(
        reference,
        copy.deepcopy(reference),
        out,
        input_size=cfg["input_size"],
        data_config=cfg,
        class_names=[f"c{i}" for i in range(5)],
        provenance={"method": "test"},
        images=real_batch("vit", n=8),
        batch=(1, 4, 8),
        precision="fp16",
        tensorrt="off",
        simplify=False,
        target=target,
    )
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("build_engine")
    return {
        name: _bundle(root / name, None if name == "default" else name) for name in ("default", "jetpack5", "jetpack7")
    }


@pytest.fixture
def stand_in(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text(STAND_IN)
    (bin_dir / "trtexec").chmod(0o755)
    return bin_dir


def run_script(
    bundle: Path, stand_in: Path, tmp: Path, version: str, precision: str, **env: str
) -> tuple[int, list[str], str, Path]:
    """Run a fresh copy of the bundle's build_engine.sh; return (exit code, trtexec's arguments, stderr, the copy)."""
    work = tmp / f"run-{version}-{precision}"
    shutil.copytree(bundle, work)
    code, build, _ = VERSIONS[version]
    args_log = tmp / "args.txt"
    args_log.unlink(missing_ok=True)
    full_env = {
        **os.environ,
        "PATH": f"{stand_in}:{os.environ['PATH']}",
        "STUB_CODE": code,
        "STUB_BUILD": build,
        "STUB_ARGS": str(args_log),
        "NV_TEGRA_RELEASE": str(tmp / "no-such-file"),
        **env,
    }
    done = subprocess.run(
        ["bash", str(work / "build_engine.sh"), precision], env=full_env, capture_output=True, text=True, timeout=60
    )
    args = args_log.read_text().splitlines() if args_log.exists() else []
    return done.returncode, args, done.stderr, work


def _layer_spec(bundle: Path) -> str:
    import onnx

    nodes = [n for ln in decomposed_layernorms(onnx.load(str(bundle / "model.onnx"))) for n in ln.nodes]
    return ",".join(f"{n}:fp32" for n in nodes)


def test_the_script_is_valid_bash(bundles):
    for bundle in bundles.values():
        assert subprocess.run(["bash", "-n", str(bundle / "build_engine.sh")]).returncode == 0


@pytest.mark.parametrize("version", ["8.6", "10.3", "10.13", "11.4"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_flags_follow_the_installed_tensorrt(bundles, stand_in, tmp_path, version, precision):
    rc, args, stderr, work = run_script(bundles["default"], stand_in, tmp_path, version, precision)
    assert rc == 0, stderr
    flags = profile_for_tensorrt(VERSIONS[version][2]).trtexec
    strongly_typed = int(version.split(".")[0]) >= 11
    onnx_file = "model_fp16.onnx" if precision == "fp16" and strongly_typed else "model.onnx"
    assert args[0] == f"--onnx={onnx_file}"
    assert flags.no_tf32 == "--noTF32" and flags.no_tf32 in args
    assert f"{flags.timing_cache}=timing.cache" in args
    assert {"--minShapes=input:1x3x32x32", "--optShapes=input:4x3x32x32", "--maxShapes=input:8x3x32x32"} <= set(args)
    if precision == "fp16" and not strongly_typed:
        assert flags.fp16 == ("--fp16",) and "--fp16" in args
    else:
        assert "--fp16" not in args
    forbidden = {"--explicitBatch", "--best", "--int8"} | (
        {"--fp16", "--precisionConstraints=obey"} if strongly_typed else set()
    )
    assert not forbidden & set(args) and not any(a.startswith("--layerPrecisions") for a in args)
    assert f"+ TensorRT {VERSIONS[version][2]}" in stderr


@pytest.mark.parametrize("version", ["8.5", "8.6", "10.3", "11.4"])
def test_tensorrt_8_5_bundles_keep_the_decomposed_layernorm_fp32_where_flags_exist(
    bundles, stand_in, tmp_path, version
):
    spec = _layer_spec(bundles["jetpack5"])
    assert spec.count(":fp32") == 7 * 5  # 5 LayerNorms (2 blocks x 2 + final norm), 7 nodes each
    rc, args, stderr, work = run_script(bundles["jetpack5"], stand_in, tmp_path, version, "fp16")
    assert rc == 0, stderr
    flags = profile_for_tensorrt(VERSIONS[version][2]).trtexec
    if flags.precision_constraints is None:  # TensorRT 11: no precision flags; the FP16 ONNX keeps LayerNorm FP32
        assert args[0] == "--onnx=model_fp16.onnx" and not any(a.startswith("--layer") for a in args)
    else:
        assert args[0] == "--onnx=model.onnx" and "--fp16" in args
        assert flags.precision_constraints in args
        assert f"{flags.layer_precisions}={spec}" in args and f"{flags.layer_output_types}={spec}" in args
    manifest = json.loads((work / "model.engine.json").read_text())
    assert manifest["fp32_layers"] == (0 if flags.precision_constraints is None else 35)
    assert manifest["target"] == "trt8.5"


def test_fp32_builds_of_a_tensorrt_8_5_bundle_pin_nothing(bundles, stand_in, tmp_path):
    rc, args, stderr, _ = run_script(bundles["jetpack5"], stand_in, tmp_path, "8.5", "fp32")
    assert rc == 0, stderr
    assert "--fp16" not in args and not any(a.startswith(("--precision", "--layer")) for a in args)


@pytest.mark.parametrize(
    "bundle, version, floor, fix",
    [
        ("default", "8.5", "8.6", "--target jetpack5"),
        ("jetpack7", "10.3", "10.13", "--target trt10"),
    ],
)
def test_a_tensorrt_older_than_the_target_is_refused_in_one_line(
    bundles, stand_in, tmp_path, bundle, version, floor, fix
):
    rc, args, stderr, work = run_script(bundles[bundle], stand_in, tmp_path, version, "fp16")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, stderr
    assert f"TensorRT {VERSIONS[version][2]} is older than this bundle's target" in lines[0]
    assert f"(TensorRT >= {floor})" in lines[0] and fix in lines[0]
    assert args == [] and not (work / "model.engine").exists() and not (work / "model.engine.json").exists()


def test_a_tensorrt_older_than_8_5_is_refused(bundles, stand_in, tmp_path):
    rc, args, stderr, _ = run_script(bundles["jetpack5"], stand_in, tmp_path, "8.5", "fp32", TRT_VERSION="8.4.3")
    assert rc == 2 and "TensorRT 8.4.3 is older than 8.5" in stderr and args == []


@pytest.mark.parametrize("given, written", [("10.3", "10.3.0"), ("10.3.0", "10.3.0"), ("10.3.0.26", "10.3.0.26")])
def test_trt_version_is_written_as_major_minor_patch(bundles, stand_in, tmp_path, given, written):
    """TRT_VERSION=10.3 once wrote "10.3" into the manifest, and infer.py then refused the engine on the TensorRT
    10.3.0 that built it: the script spells it in full, and infer.py accepts it there."""
    rc, args, stderr, work = run_script(bundles["default"], stand_in, tmp_path, "10.3", "fp16", TRT_VERSION=given)
    assert rc == 0 and args, stderr
    manifest = json.loads((work / "model.engine.json").read_text())
    assert manifest["tensorrt_version"] == written
    facts = {"tensorrt_version": "10.3.0.26", "gpu": manifest["gpu"], "jetson": None}
    assert engine_problems(manifest, facts) == ([], [])


@pytest.mark.parametrize("given", ["ten", "10.3.x", "10..3", "v10.3"])
def test_a_malformed_trt_version_is_one_line(bundles, stand_in, tmp_path, given):
    rc, args, stderr, work = run_script(bundles["default"], stand_in, tmp_path, "10.3", "fp16", TRT_VERSION=given)
    assert rc == 2 and args == [] and not (work / "model.engine.json").exists()
    assert stderr.strip() == f"build_engine.sh: TRT_VERSION must be a TensorRT version like 10.3.0, got '{given}'"


def test_the_manifest_describes_the_engine_the_stand_in_wrote(bundles, stand_in, tmp_path):
    rc, args, stderr, work = run_script(
        bundles["default"], stand_in, tmp_path, "11.4", "fp16", STUB_GPU="NVIDIA GeForce RTX 4090", STUB_CC="8.9"
    )
    assert rc == 0, stderr
    manifest = json.loads((work / "model.engine.json").read_text())
    assert manifest["format"] == "peftx-engine-manifest" and manifest["tensorrt_version"] == "11.4.0"
    assert manifest["gpu"] == {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    assert manifest["engine_sha256"] == sha256_file(work / "model.engine")
    assert manifest["source_onnx"] == "model_fp16.onnx"  # what TensorRT 11 built
    assert manifest["source_onnx_sha256"] == sha256_file(work / "model_fp16.onnx")
    assert manifest["batch"] == {"min": 1, "opt": 4, "max": 8} and manifest["precision"] == "fp16"
    assert manifest["jetson"] is None and manifest["target"] == "trt8.6"
    assert not list(work.glob(".model.engine.partial*")), "no partial file may remain"
    here = {
        "tensorrt_version": "11.4.0.11",
        "gpu": manifest["gpu"],
        "jetson": None,
        "sha256": {
            "model.engine": sha256_file(work / "model.engine"),
            "model_fp16.onnx": sha256_file(work / "model_fp16.onnx"),
        },
    }
    assert engine_problems(manifest, here) == ([], []), "the manifest the script writes is one infer.py accepts"
    assert "polygraphy run model.engine --model-type engine --trt" in stderr  # the re-check lines for the device
    assert "model_int8.onnx" not in stderr  # no INT8 graph in this bundle, so no line for it


def test_on_a_jetson_the_manifest_records_l4t_and_the_model(bundles, stand_in, tmp_path):
    release = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 2023\n"
    (tmp_path / "nv_tegra_release").write_text(release)
    (tmp_path / "model").write_bytes(b"NVIDIA Jetson Xavier NX Developer Kit\0")
    rc, _, stderr, work = run_script(
        bundles["jetpack5"],
        stand_in,
        tmp_path,
        "8.5",
        "fp16",
        NV_TEGRA_RELEASE=str(tmp_path / "nv_tegra_release"),
        DEVICE_TREE_MODEL=str(tmp_path / "model"),
    )
    assert rc == 0, stderr
    jetson = json.loads((work / "model.engine.json").read_text())["jetson"]
    assert jetson == {"model": "NVIDIA Jetson Xavier NX Developer Kit", "l4t": "35.4.1"}
    assert parse_l4t(release) == "35.4.1"  # the script and infer.py read the file the same way


def test_a_failed_build_leaves_neither_engine_nor_manifest(bundles, stand_in, tmp_path):
    rc, _, stderr, work = run_script(bundles["default"], stand_in, tmp_path, "10.3", "fp32", STUB_FAIL="1")
    assert rc != 0
    assert not (work / "model.engine").exists() and not (work / "model.engine.json").exists()
    assert not list(work.glob(".model.engine.partial*"))


def test_an_unready_bundle_is_refused(bundles, stand_in, tmp_path):
    unready = shutil.copytree(bundles["default"], tmp_path / "unready")
    script = unready / "build_engine.sh"
    script.write_text(script.read_text().replace('READY="1"', 'READY="0"'))
    rc, args, stderr, _ = run_script(unready, stand_in, tmp_path, "10.3", "fp16")
    assert rc == 2 and "failed TensorRT readiness for trt8.6" in stderr and args == []
    assert read_bundle(bundles["default"])["target"]["ready"] is True  # the real bundle is ready


def test_missing_trtexec_and_unreadable_banner_are_one_line_each(bundles, stand_in, tmp_path):
    work = shutil.copytree(bundles["default"], tmp_path / "b")
    env = {**os.environ, "PATH": "/usr/bin:/bin", "TRTEXEC": "no-such-trtexec"}
    done = subprocess.run(["bash", str(work / "build_engine.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "trtexec not found" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    mute = stand_in / "quiet-trtexec"
    mute.write_text("#!/usr/bin/env bash\nexit 0\n")
    mute.chmod(0o755)
    done = subprocess.run(
        ["bash", str(work / "build_engine.sh")], env={**env, "TRTEXEC": str(mute)}, capture_output=True, text=True
    )
    assert done.returncode == 2 and "cannot read the TensorRT version" in done.stderr and "TRT_VERSION" in done.stderr


@pytest.fixture(scope="module")
def int8_bundles(tmp_path_factory) -> dict[str, Path]:
    """--precision int8 bundles (model_int8.onnx, a Q/DQ graph) for the default target and TensorRT 8.5."""
    from test_int8 import _labelled, _request

    from peftx.exports.accuracy import select

    root = tmp_path_factory.mktemp("build_engine_int8")
    reference = make_tiny("vit", seed=4)
    cfg = tiny_data_cfg("vit")
    out = {}
    for name in ("default", "jetpack5"):
        out[name] = root / name
        write_bundle(
            reference,
            copy.deepcopy(reference),
            out[name],
            input_size=cfg["input_size"],
            data_config=cfg,
            class_names=[f"c{i}" for i in range(5)],
            provenance={"method": "test"},
            images=real_batch("vit", n=8),
            batch=(1, 4, 8),
            precision="int8",
            tensorrt="off",
            simplify=False,
            target=None if name == "default" else name,
            accuracy_set=select(_labelled(reference, "vit", 120, seed=1), "crops", None),
            int8=_request(_labelled(reference, "vit", 48, seed=2)),
        )
    return out


@pytest.mark.parametrize("version", ["8.5", "8.6", "10.3", "10.13", "11.4"])
def test_int8_builds_the_qdq_graph_with_each_versions_flags(int8_bundles, stand_in, tmp_path, version):
    bundle = int8_bundles["jetpack5" if version == "8.5" else "default"]
    rc, args, stderr, work = run_script(bundle, stand_in, tmp_path, version, "int8")
    assert rc == 0, stderr
    profile = profile_for_tensorrt(VERSIONS[version][2])
    assert args[0] == "--onnx=model_int8.onnx"  # explicit quantization on every version: never a calibrator
    assert not any(a.startswith("--calib") for a in args) and "--best" not in args
    if profile.int8.trtexec_flags:  # 8.x / 10.x: INT8 kernels on, the float parts in FP16
        assert [a for a in args if a in ("--int8", "--fp16")] == [*profile.int8.trtexec_flags, "--fp16"]
    else:  # 11: strongly typed, the Q/DQ nodes say what is INT8
        assert not {"--int8", "--fp16", "--precisionConstraints=obey"} & set(args)
    manifest = json.loads((work / "model.engine.json").read_text())
    assert manifest["precision"] == "int8" and manifest["source_onnx"] == "model_int8.onnx"
    assert manifest["source_onnx_sha256"] == sha256_file(work / "model_int8.onnx")
    if version == "8.5":  # its decomposed LayerNorm stays FP32 in the INT8 build too, by the Q/DQ graph's node names
        spec = _layer_spec(bundle)
        assert f"--layerPrecisions={spec}" in args and "--precisionConstraints=obey" in args
        assert manifest["fp32_layers"] == 35
    else:
        assert not any(a.startswith("--layer") for a in args)
    # the device re-check compares the INT8 engine with the Q/DQ graph it was built from, not with model.onnx
    assert "polygraphy run model_int8.onnx --onnxrt --load-inputs check_inputs.json" in stderr


def test_int8_without_the_qdq_graph_is_refused(bundles, stand_in, tmp_path):
    rc, args, stderr, _ = run_script(bundles["default"], stand_in, tmp_path, "10.3", "int8")
    assert rc == 2 and not args and "model_int8.onnx" in stderr and len(stderr.strip().splitlines()) == 1
