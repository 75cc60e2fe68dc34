"""The bundle's build_engine.sh, run for real against a trtexec STAND-IN that parses argv as each release does.

TensorRT cannot exist on the machines these tests run on (no GPU, and its wheels fetch from a host they cannot
reach), so nothing here builds an engine. The stand-in (tests/trtexec_stand_in.py) reads what one release's trtexec
accepts from tests/data/trtexec/trtexec_options_<release>.json, transcribed by scripts/transcribe_trtexec_options.py
from samples/common/sampleOptions.cpp (and trtexec.cpp, logging.h, the version headers) of NVIDIA/TensorRT's
release/8.5, 8.6, 10.3, 10.13 and 11.1 branches: it prints that release's banner ("[TensorRT v8503]" on 8.x,
"[TensorRT v100300]" on 10.3, "[TensorRT v110100] [b106]" from 10.4 on), splits each word at its first '=', fails a
word the release does not read with "[E] Unknown option: ..." and exit 1, and writes an engine file only for a valid
command line. The flags a test expects are derived from the same transcription (which options the release has),
never from exports/targets.py, so a wrong table in targets.py cannot make its own test pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_tiny, write_tiny_bundle
from trtexec_stand_in import RELEASES, install, load

from peftx.errors import ParityError
from peftx.exports.bundle import read_bundle
from peftx.exports.layernorm import decomposed_layernorms
from peftx.exports.targets import all_targets, profile_for_tensorrt, version_tuple
from peftx.exports.templates.infer import engine_problems, parse_l4t
from peftx.fsutil import sha256_file

pytestmark = [
    pytest.mark.slow,  # every target's bundles built, build_engine.sh run per release
    pytest.mark.skipif(
        shutil.which("bash") is None or shutil.which("sha256sum") is None,
        reason="build_engine.sh needs bash and coreutils",
    ),
]

TABLES = {release: load(release) for release in RELEASES}


def version_of(release: str) -> str:
    """The version the release's banner reports, as build_engine.sh must read it (major.minor.patch)."""
    return ".".join(TABLES[release]["tensorrt_version"].split(".")[:3])


def has(release: str, option: str) -> bool:
    """Whether that release's trtexec reads ``option`` (the transcription, not targets.py)."""
    spec = TABLES[release]["options"].get(option)
    return bool(spec and spec["consumed"])


def _bundle(out: Path, target: str | None) -> Path:
    write_tiny_bundle(out, make_tiny("vit", seed=4), precision="fp16", target=target)
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """FP16 bundles without an INT8 graph: the default target, and jetpack7 (trt10 with a 10.13 floor)."""
    root = tmp_path_factory.mktemp("build_engine")
    return {name: _bundle(root / name, None if name == "default" else name) for name in ("default", "jetpack7")}


@pytest.fixture
def stand_in(tmp_path) -> Path:
    """A bin/ with the stand-in as `trtexec` (the release is chosen per run by TRTEXEC_STAND_IN_RELEASE)."""
    bin_dir = tmp_path / "bin"
    install(bin_dir, "10.3")
    return bin_dir


def run_script(
    bundle: Path, stand_in: Path, tmp: Path, release: str, precision: str, **env: str
) -> tuple[int, dict, str, Path]:
    """Run a fresh copy of the bundle's build_engine.sh under ``release``'s trtexec; return (exit code, the command
    line as the stand-in parsed it ({} when it did not accept one), stderr, the copy)."""
    work = tmp / f"run-{release}-{precision}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(bundle, work)
    log = tmp / "trtexec.json"
    log.unlink(missing_ok=True)
    full_env = {
        **os.environ,
        "PATH": f"{stand_in}:{os.environ['PATH']}",
        "TRTEXEC_STAND_IN_RELEASE": release,
        "TRTEXEC_STAND_IN_LOG": str(log),
        "NV_TEGRA_RELEASE": str(tmp / "no-such-file"),
        **env,
    }
    done = subprocess.run(
        ["bash", str(work / "build_engine.sh"), precision], env=full_env, capture_output=True, text=True, timeout=60
    )
    parsed = json.loads(log.read_text()) if log.exists() else {}
    return done.returncode, parsed, done.stderr, work


def _layer_spec(bundle: Path) -> str:
    import onnx

    nodes = [n for ln in decomposed_layernorms(onnx.load(str(bundle / "model.onnx"))) for n in ln.nodes]
    return ",".join(f"{n}:fp32" for n in nodes)


@pytest.fixture(scope="module")
def int8_bundles(tmp_path_factory) -> dict[str, Path]:
    """One --precision int8 bundle per target of `peftx targets`: model.onnx, model_fp16.onnx (always written) and
    model_int8.onnx (the Q/DQ graph), so each one builds fp32, fp16 and int8 engines.

    The INT8 accuracy gate (test_int8.py's subject) may mark a bundle failed on a CPU whose fused int8 kernels
    saturate (AVX2 without VNNI); the bundle is written all the same, with the build_engine.sh and ONNX files it
    ships, and those are what is tested here. Any other failure is an error."""
    from test_int8 import _labelled, _request

    from peftx.exports.accuracy import select

    root = tmp_path_factory.mktemp("build_engine_int8")
    reference = make_tiny("vit", seed=4)
    # small sets (the gate's statistics are test_int8.py's business): 40 labelled crops, the 32 calibration needs
    accuracy_set = select(_labelled(reference, "vit", 40, seed=1), "crops", None)
    request = _request(_labelled(reference, "vit", 32, seed=2))
    out = {}
    for target in all_targets():
        out[target.name] = root / target.name
        try:
            write_tiny_bundle(
                out[target.name],
                reference,
                precision="int8",
                target=target.name,
                accuracy_set=accuracy_set,
                int8=request,
            )
        except ParityError as exc:
            if "int8" not in str(exc) or read_bundle(out[target.name])["status"] != "failed":
                raise
    return out


def test_the_script_is_valid_bash(bundles):
    for bundle in bundles.values():
        assert subprocess.run(["bash", "-n", str(bundle / "build_engine.sh")]).returncode == 0


def test_the_transcriptions_name_their_source():
    for release, table in TABLES.items():
        assert table["repository"] == "https://github.com/NVIDIA/TensorRT" and table["ref"] == f"release/{release}"
        assert len(table["commit"]) == 40 and table["commit"] in table["source"]
        assert table["tensorrt_version"].startswith(release + ".")
        assert {"--onnx", "--saveEngine", "--noTF32", "--minShapes", "--help"} <= set(table["options"])
    # what changed between the releases, as read from the source: 10.0 dropped the implicit-batch and UFF/Caffe
    # options and --workspace; 11 dropped every weak-typing precision flag
    assert {"--workspace", "--explicitBatch", "--maxBatch", "--batch"} <= set(
        TABLES["10.3"]["removed_since"]["options"]
    )
    assert {"--fp16", "--int8", "--best", "--precisionConstraints", "--layerPrecisions"} <= set(
        TABLES["11.1"]["removed_since"]["options"]
    )
    assert TABLES["8.5"]["banner"]["code"] == 8503 and not TABLES["10.3"]["banner"]["build_tag"]
    assert TABLES["10.13"]["banner"]["code"] == 101300 and TABLES["10.13"]["banner"]["build_tag"]
    assert [TABLES[r]["unknown_option"]["failed_line"] for r in RELEASES] == [True, True, True, True, False]


def _claims() -> list[tuple[str, str]]:
    """(target, release) for every transcribed release a target says it builds with (TensorRT >= its floor)."""
    return [
        (t.name, r)
        for t in all_targets()
        for r in RELEASES
        if version_tuple(version_of(r)) >= version_tuple(t.tensorrt_min)
    ]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("target, release", _claims())
def test_every_bundle_kind_builds_under_every_release_its_target_claims(
    int8_bundles, stand_in, tmp_path, target, release, precision
):
    bundle = int8_bundles[target]
    rc, parsed, stderr, work = run_script(bundle, stand_in, tmp_path, release, precision)
    assert rc == 0, stderr
    assert parsed["release"] == release and (work / "model.engine").is_file()
    options = parsed["options"]
    # what this release's trtexec offers decides what must be asked for
    typed_by_flags = has(release, "--fp16")  # 8.x/10.x: precisions are builder flags; 11: strongly typed
    onnx_file = {
        "fp32": "model.onnx",
        "fp16": "model.onnx" if typed_by_flags else "model_fp16.onnx",
        "int8": "model_int8.onnx",  # explicit quantization everywhere: never a calibrator
    }[precision]
    assert options["--onnx"] == onnx_file
    assert "--noTF32" in options and options["--timingCacheFile"] == "timing.cache"
    assert options["--saveEngine"] == ".model.engine.partial"
    assert (options["--minShapes"], options["--optShapes"], options["--maxShapes"]) == (
        "input:1x3x32x32",
        "input:4x3x32x32",
        "input:8x3x32x32",
    )
    asked = {o for o in ("--fp16", "--int8", "--best", "--calib") if o in options}
    if precision == "fp32" or not typed_by_flags:
        assert asked == set()
    elif precision == "fp16":
        assert asked == {"--fp16"}
    else:  # the Q/DQ graph needs INT8 kernels enabled on a weakly typed builder, the float parts in FP16
        assert has(release, "--int8") and asked == {"--int8", "--fp16"}
    pinned = target == "trt8.5" and precision != "fp32" and has(release, "--precisionConstraints")
    if pinned:  # 8.5's decomposed LayerNorm stays FP32 in reduced-precision builds, where the flags exist
        spec = _layer_spec(bundle)
        assert spec.count(":fp32") == 7 * 5  # 5 LayerNorms (2 blocks x 2 + final norm), 7 nodes each
        assert options["--precisionConstraints"] == "obey"
        assert options["--layerPrecisions"] == spec and options["--layerOutputTypes"] == spec
    else:
        assert not any(o in options for o in ("--precisionConstraints", "--layerPrecisions", "--layerOutputTypes"))
    manifest = json.loads((work / "model.engine.json").read_text())
    assert manifest["tensorrt_version"] == version_of(release) and f"+ TensorRT {version_of(release)}" in stderr
    assert manifest["precision"] == precision and manifest["source_onnx"] == onnx_file
    assert manifest["source_onnx_sha256"] == sha256_file(work / onnx_file)
    assert manifest["fp32_layers"] == (35 if pinned else 0) and manifest["target"] == target


def test_targets_py_names_only_options_each_release_reads():
    """The table build_engine.sh's Python side describes (exports/targets.py) checked against the transcription."""
    for release in RELEASES:
        profile = profile_for_tensorrt(version_of(release))
        assert profile is not None
        flags = profile.trtexec
        named = [flags.no_tf32, flags.timing_cache, *flags.fp16, *profile.int8.trtexec_flags]
        named += [f for f in (flags.precision_constraints, flags.layer_precisions, flags.layer_output_types) if f]
        named += [flags.explicit_batch] if flags.explicit_batch else []
        for flag in named:
            assert has(release, flag.split("=")[0]), f"{profile.name} names {flag}, which trtexec {release} lacks"
        # and it does not leave out what a weakly typed release needs
        assert bool(flags.fp16) == has(release, "--fp16") and bool(profile.int8.trtexec_flags) == has(release, "--int8")
        if flags.precision_constraints:
            assert flags.precision_constraints.split("=")[1] in TABLES[release]["precision_constraints"]


_WRONG = [
    ("11.1", ["--fp16"], "Unknown option: --fp16 "),
    ("11.1", ["--int8"], "Unknown option: --int8 "),
    ("11.1", ["--precisionConstraints=obey"], "Unknown option: --precisionConstraints obey"),
    ("10.3", ["--workspace=1024"], "Unknown option: --workspace 1024"),
    ("10.13", ["--explicitBatch"], "Unknown option: --explicitBatch "),
    ("10.13", ["--maxBatch=8"], "Unknown option: --maxBatch 8"),
    ("8.5", ["--layerPrecisions=a:fp33"], "Invalid DataType fp33"),
    ("8.6", ["--precisionConstraints=strict"], "Unknown precision constraints: strict"),
    ("10.3", ["--minShapes=input:1xbx32x32"], "stoi"),
    ("8.5", ["--saveEngine", "model.engine"], "Unknown option: model.engine "),
    ("11.1", ["--saveEngine", "model.engine"], "Unknown option: model.engine "),
    ("10.3", ["--noTF32"], "Unknown option: --noTF32 "),  # a second copy of a flag is left over
]


@pytest.mark.parametrize("release, words, message", _WRONG)
def test_a_wrong_option_fails_as_that_release_fails_it(tmp_path, release, words, message):
    table = TABLES[release]
    exe = install(tmp_path / "bin", release)
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRTEXEC_STAND_IN")}

    def trtexec(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([str(exe), *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)

    base = ["--onnx=model.onnx", "--noTF32"]
    done = trtexec([*base, "--saveEngine=ok.engine"])
    assert done.returncode == 0 and (tmp_path / "ok.engine").is_file(), done.stderr  # the line without the mistake
    save = [] if any(w.startswith("--saveEngine") for w in words) else ["--saveEngine=bad.engine"]
    done = trtexec([*base, *save, *words])
    assert done.returncode == table["unknown_option"]["exit_code"] == 1
    assert f"] [E] {message}" in done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("&&&& RUNNING TensorRT.trtexec [TensorRT v")
    assert first.endswith(" # " + " ".join([str(exe), *base, *save, *words]))
    assert ("&&&& FAILED" in done.stdout) == table["unknown_option"]["failed_line"]
    assert not (tmp_path / "bad.engine").exists() and not (tmp_path / "model.engine").exists()
    name = message.split()[2] if message.startswith("Unknown option: --") else ""
    if name and name not in base:  # an option this release does not read, though another release does
        assert not has(release, name) and any(has(r, name) for r in RELEASES)


def test_a_build_script_with_an_option_its_trtexec_lacks_fails_and_leaves_nothing(int8_bundles, stand_in, tmp_path):
    """A trt10 bundle's script with --fp16 forced into every build: 11.1 does not read it, 10.13 reads it once."""
    wrong = shutil.copytree(int8_bundles["trt10"], tmp_path / "wrong")
    script = wrong / "build_engine.sh"
    text = script.read_text()
    assert "FLAGS=(--noTF32)" in text
    script.write_text(text.replace("FLAGS=(--noTF32)", "FLAGS=(--noTF32 --fp16)"))
    for release, precision in (("11.1", "fp32"), ("10.13", "fp16")):  # 10.13 fp16: --fp16 twice, one left over
        rc, parsed, stderr, work = run_script(wrong, stand_in, tmp_path, release, precision)
        assert rc == 2 and parsed == {}
        assert (
            stderr.strip()
            .splitlines()[-1]
            .startswith("build_engine.sh: trtexec failed (exit 1): Unknown option: --fp16")
        )
        assert "Unknown option: --fp16" in (work / "model.engine.log").read_text()
        assert not (work / "model.engine").exists() and not (work / "model.engine.json").exists()
        assert not list(work.glob(".model.engine.partial*"))
    rc, parsed, stderr, _ = run_script(wrong, stand_in, tmp_path, "10.13", "fp32")
    assert rc == 0 and parsed["options"]["--fp16"] == "", stderr


@pytest.mark.parametrize(
    "bundle, release, floor, fix",
    [
        ("default", "8.5", "8.6", "--target jetpack5"),
        ("jetpack7", "10.3", "10.13", "--target trt10"),
    ],
)
def test_a_tensorrt_older_than_the_target_is_refused_in_one_line(
    bundles, stand_in, tmp_path, bundle, release, floor, fix
):
    rc, parsed, stderr, work = run_script(bundles[bundle], stand_in, tmp_path, release, "fp16")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, stderr
    assert f"TensorRT {version_of(release)} is older than this bundle's target" in lines[0]
    assert f"(TensorRT >= {floor})" in lines[0] and fix in lines[0]
    assert parsed == {} and not (work / "model.engine").exists() and not (work / "model.engine.json").exists()


def test_a_tensorrt_older_than_8_5_is_refused(int8_bundles, stand_in, tmp_path):
    rc, parsed, stderr, _ = run_script(int8_bundles["trt8.5"], stand_in, tmp_path, "8.5", "fp32", TRT_VERSION="8.4.3")
    assert rc == 2 and "TensorRT 8.4.3 is older than 8.5" in stderr and parsed == {}


def test_jetpack5s_banner_reads_as_8_5_2(int8_bundles, stand_in, tmp_path):
    """JetPack 5.1's trtexec is 8.5.2.2: "[TensorRT v8502]" in the 8.x formula."""
    rc, _, stderr, work = run_script(
        int8_bundles["trt8.5"], stand_in, tmp_path, "8.5", "fp16", TRTEXEC_STAND_IN_VERSION="8.5.2.2"
    )
    assert rc == 0, stderr
    assert json.loads((work / "model.engine.json").read_text())["tensorrt_version"] == "8.5.2"


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
    assert rc == 2 and args == {} and not (work / "model.engine.json").exists()
    assert stderr.strip() == f"build_engine.sh: TRT_VERSION must be a TensorRT version like 10.3.0, got '{given}'"


def test_the_manifest_describes_the_engine_the_stand_in_wrote(bundles, stand_in, tmp_path):
    rc, _, stderr, work = run_script(
        bundles["default"],
        stand_in,
        tmp_path,
        "11.1",
        "fp16",
        TRTEXEC_STAND_IN_GPU="NVIDIA GeForce RTX 4090",
        TRTEXEC_STAND_IN_CC="8.9",
    )
    assert rc == 0, stderr
    manifest = json.loads((work / "model.engine.json").read_text())
    assert manifest["format"] == "peftx-engine-manifest" and manifest["tensorrt_version"] == "11.1.0"
    assert manifest["gpu"] == {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    assert manifest["engine_sha256"] == sha256_file(work / "model.engine")
    assert manifest["source_onnx"] == "model_fp16.onnx"  # what TensorRT 11 built
    assert manifest["source_onnx_sha256"] == sha256_file(work / "model_fp16.onnx")
    assert manifest["batch"] == {"min": 1, "opt": 4, "max": 8} and manifest["precision"] == "fp16"
    assert manifest["jetson"] is None and manifest["target"] == "trt8.6"
    assert not list(work.glob(".model.engine.partial*")), "no partial file may remain"
    here = {
        "tensorrt_version": TABLES["11.1"]["tensorrt_version"],
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


def test_on_a_jetson_the_manifest_records_l4t_and_the_model(int8_bundles, stand_in, tmp_path):
    release = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 2023\n"
    (tmp_path / "nv_tegra_release").write_text(release)
    (tmp_path / "model").write_bytes(b"NVIDIA Jetson Xavier NX Developer Kit\0")
    rc, _, stderr, work = run_script(
        int8_bundles["trt8.5"],
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
    rc, _, stderr, work = run_script(bundles["default"], stand_in, tmp_path, "10.3", "fp32", TRTEXEC_STAND_IN_FAIL="1")
    assert rc == 2 and "build_engine.sh: trtexec failed (exit 1): Error[4]: engine build failed" in stderr
    assert not (work / "model.engine").exists() and not (work / "model.engine.json").exists()
    assert not list(work.glob(".model.engine.partial*"))


def test_an_unready_bundle_is_refused(bundles, stand_in, tmp_path):
    unready = shutil.copytree(bundles["default"], tmp_path / "unready")
    script = unready / "build_engine.sh"
    script.write_text(script.read_text().replace('READY="1"', 'READY="0"'))
    rc, parsed, stderr, _ = run_script(unready, stand_in, tmp_path, "10.3", "fp16")
    assert rc == 2 and "failed TensorRT readiness for trt8.6" in stderr and parsed == {}
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


def test_int8_builds_are_rechecked_against_their_own_qdq_graph(int8_bundles, stand_in, tmp_path):
    rc, _, stderr, _ = run_script(int8_bundles["trt8.6"], stand_in, tmp_path, "10.3", "int8")
    assert rc == 0, stderr
    # the device re-check compares the INT8 engine with the Q/DQ graph it was built from, not with model.onnx
    assert "polygraphy run model_int8.onnx --onnxrt --load-inputs check_inputs.json" in stderr


def test_int8_without_the_qdq_graph_is_refused(bundles, stand_in, tmp_path):
    rc, parsed, stderr, _ = run_script(bundles["default"], stand_in, tmp_path, "10.3", "int8")
    assert rc == 2 and not parsed and "model_int8.onnx" in stderr and len(stderr.strip().splitlines()) == 1
