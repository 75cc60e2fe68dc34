"""On-device timing (``infer.py --bench``, the bundle's device_bench.py) run for real through ONNX Runtime on a bundle
made here, its device_report.json, and ``peftx report`` beside the host's validation (refusing another bundle's).
TensorRT parts skip: no TensorRT here."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_tiny
from test_handoff import flip_a_weight_byte, one_line, run_infer
from test_int8 import _labelled, _request, _write
from trtexec_stand_in import install as install_trtexec
from typer.testing import CliRunner

from peftx.cli.app import app
from peftx.exports import device_report
from peftx.exports.bundle import read_bundle
from peftx.fsutil import sha256_file

pytestmark = pytest.mark.slow  # bundles built, timed and checked end to end: make test-fast skips the module

TEMPLATE = Path(__file__).resolve().parents[1] / "exports" / "templates" / "device_bench.py"
BENCH = ("--bench", "--duration", "0.5", "--batch", "1,4")


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An INT8 bundle of a tiny ViT (model.onnx, model_fp16.onnx, model_int8.onnx), checked and benched once."""
    model = make_tiny("vit")
    out = tmp_path_factory.mktemp("devreport") / "bundle"
    _write(model, "vit", out, calibration=_request(_labelled(model, "vit", 64, seed=0)), accuracy_n=60)
    return out


@pytest.fixture(scope="module")
def benched(bundle_dir: Path):
    done = run_infer(bundle_dir, "--check", *BENCH)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads((bundle_dir / "device_report.json").read_text(encoding="utf-8"))


def test_device_bench_ships_hashed_beside_infer(bundle_dir):
    meta = read_bundle(bundle_dir)
    assert (bundle_dir / "device_bench.py").read_bytes() == TEMPLATE.read_bytes()
    assert "device_bench.py" in meta["sha256"]


def test_bench_times_every_onnx_artifact_for_real(benched, bundle_dir):
    done, report = benched
    meta = read_bundle(bundle_dir)
    assert report["format"] == "peftx-device-report" and report["checked"] and report["check_exit"] == 0
    assert [a["precision"] for a in report["artifacts"]] == ["fp32", "fp16", "int8"]
    assert report["bench"]["batches"] == [1, 4] and report["bench"]["duration_s"] == 0.5
    for art in report["artifacts"]:
        assert art["runtime"] == "onnxruntime" and art["provider"] == "CPUExecutionProvider"
        check = art["check"]
        assert check["verdict"] == "PASS" and check["max_abs"] <= check["bound"], art
        assert 0 < check["max_abs"] and check["labelled_images"] > 0  # a real run: logits differ from the reference
        for batch in ("1", "4"):
            for figure in ("compute", "end_to_end"):
                s = art["timings"][batch][figure]
                assert s["iterations"] >= 10  # trtexec's minimum
                assert s["min_ms"] <= s["p10_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
                assert s["iqr_ms"] >= 0
                assert s["throughput_ips"] == pytest.approx(int(batch) * 1000 / s["mean_ms"], rel=1e-6)
            # decoding + preprocessing + the same model cannot be faster than the model alone
            assert art["timings"][batch]["end_to_end"]["median_ms"] > art["timings"][batch]["compute"]["median_ms"]
    # the bundle's sha256 values as read on the device: every file metadata.json records, none modified
    assert report["bundle"]["sha256"] == meta["sha256"] == report["bundle"]["sha256_recorded"]
    assert report["bundle"]["modified"] == [] and report["bundle"]["missing"] == []
    device = report["device"]
    assert device["onnxruntime"]["version"] and isinstance(device["cpu"]["flags"], dict)
    assert set(device["cpu"]["flags"]) >= {"avx2", "avx512_vnni"}
    assert device["gpu"]["frequency"]["cur_freq"] == "unknown" or device["gpu"]["frequency"]["source"] != "unknown"
    # the recommendation: the fastest PASS artifact by median compute at the largest batch, recomputed here
    rec = report["recommendation"]
    fastest = min(report["artifacts"], key=lambda a: a["timings"]["4"]["compute"]["median_ms"])
    assert rec["artifact"] == fastest["name"] and rec["batch"] == 4
    assert rec["median_ms"] == fastest["timings"]["4"]["compute"]["median_ms"]
    lines = done.stdout.splitlines()
    assert any(line.startswith("check passed") for line in lines)  # --check ran as it does alone
    assert any(line.startswith(f"recommended: {rec['precision']} (onnxruntime") for line in lines)
    rows = [line for line in lines if line.startswith(("fp32 ", "fp16 ", "int8 "))]  # the table's rows
    assert len(rows) == 3 and all(re.search(r"\(onnxruntime CPUExecutionProvider\) +PASS ", r) for r in rows)


def test_rounds_are_interleaved_round_robin():
    bench = _module(TEMPLATE, "device_bench_under_test")
    log: list[str] = []
    ticks = iter(float(i) for i in range(10_000))  # every clock read advances 1 s: slices end on the run count
    units = [(key, lambda key=key: log.append(key)) for key in "abc"]
    samples = bench.measure(units, duration=2.5, warmup=0.0, rounds=5, clock=lambda: next(ticks))
    warm, timed = log[:6], log[6:]
    assert warm == ["a", "a", "b", "b", "c", "c"]  # MIN_WARMUP_RUNS each, before any timing
    per_slice = bench.MIN_ITERATIONS // 5  # MIN_ITERATIONS runs in all, spread over the 5 rounds
    assert timed == [k for order in ("abc", "bca", "cab", "abc", "bca") for k in order for _ in range(per_slice)]
    assert {k: len(v) for k, v in samples.items()} == {k: bench.MIN_ITERATIONS for k in "abc"}


def test_bench_without_check_times_but_recommends_nothing(bundle_dir, tmp_path):
    out = Path(shutil.copytree(bundle_dir, tmp_path / "b"))
    done = run_infer(out, "--bench", "--duration", "0.2", "--batch", "2", "--precision", "fp16")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "device_report.json").read_text(encoding="utf-8"))
    assert not report["checked"] and report["recommendation"] is None
    assert [a["precision"] for a in report["artifacts"]] == ["fp16"] and "check" not in report["artifacts"][0]
    assert "recommended: none — no check ran" in done.stdout


def test_a_modified_artifact_fails_is_named_and_never_recommended(bundle_dir, tmp_path):
    out = Path(shutil.copytree(bundle_dir, tmp_path / "b"))
    flip_a_weight_byte(out / "model.onnx")
    done = run_infer(out, "--check", "--bench", "--duration", "0.2", "--batch", "1")
    report = json.loads((out / "device_report.json").read_text(encoding="utf-8"))
    fp32 = next(a for a in report["artifacts"] if a["precision"] == "fp32")
    assert fp32["check"]["verdict"] == "FAIL" and "sha256" in fp32["check"]["problems"][0]
    assert report["bundle"]["modified"] == ["model.onnx"]
    assert report["recommendation"]["precision"] != "fp32"
    assert done.returncode == 1 and report["check_exit"] == 1  # --check's own exit status: fp32 is required
    result = CliRunner().invoke(app, ["report", str(out / "device_report.json")])
    assert result.exit_code == 0, result.output
    assert "warning: the device's model.onnx differs from the bundle" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--batch", "0,4"), "infer.py: --batch 0,4: give positive batch sizes separated by commas, e.g. 1,8"),
        (("--duration", "0"), "infer.py: --duration 0.0: must be a positive number of seconds"),
    ],
)
def test_bad_bench_options_are_one_line(bundle_dir, args, expected):
    done = run_infer(bundle_dir, "--bench", *args)
    assert done.returncode == 2 and one_line(done) == expected


def test_report_shows_the_device_beside_the_host(benched, bundle_dir):
    _, report = benched
    result = CliRunner().invoke(app, ["report", str(bundle_dir / "device_report.json")], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    for precision in ("fp32", "fp16", "int8"):
        assert any(line.startswith(precision) and "ORT CPU" in line for line in result.output.splitlines())
    assert f"recommended (*): {report['recommendation']['precision']}" in result.output
    as_json = CliRunner().invoke(app, ["report", str(bundle_dir / "device_report.json"), "--json"])
    rows = json.loads(as_json.output)["rows"]
    meta = read_bundle(bundle_dir)
    parity = json.loads((bundle_dir / "parity.json").read_text(encoding="utf-8"))
    for row in rows:
        host_acc = meta["accuracy"]["artifacts"][f"onnxruntime {row['precision']}"]["accuracy"]
        host_parity = next(r for r in parity["results"] if r["candidate"] == f"onnxruntime {row['precision']}")
        assert row["host"]["accuracy"] == host_acc
        assert row["host"]["max_abs"] == host_parity["overall"]["max_abs"]
        device = next(a for a in report["artifacts"] if a["name"] == row["device_artifact"])
        assert row["device_max_abs"] == device["check"]["max_abs"]
        assert row["latency_ms"]["4"]["compute"]["median_ms"] == device["timings"]["4"]["compute"]["median_ms"]


def test_report_of_another_bundle_is_refused(benched, bundle_dir, tmp_path):
    other = tmp_path / "other"
    model = make_tiny("vit", seed=3)
    _write(model, "vit", other, calibration=_request(_labelled(model, "vit", 40, seed=2)), accuracy_n=40)
    report = bundle_dir / "device_report.json"
    result = CliRunner().invoke(app, ["report", str(report), "--bundle", str(other)])
    assert result.exit_code == 2
    line = result.stderr.strip() if result.stderr_bytes is not None else result.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in result.output
    assert line.startswith(f"peftx: error: {report} is a report of another bundle than {other} (")
    assert "model.onnx sha256" in line
    with pytest.raises(Exception, match="another bundle"):
        device_report.compare(report, other)


def test_not_a_report_is_one_line(tmp_path, bundle_dir):
    bad = tmp_path / "device_report.json"
    bad.write_text("{not json", encoding="utf-8")
    result = CliRunner().invoke(app, ["report", str(bad), "--bundle", str(bundle_dir)])
    assert result.exit_code == 2 and "is unreadable" in result.output
    bad.write_text(json.dumps({"format": "something else"}), encoding="utf-8")
    result = CliRunner().invoke(app, ["report", str(bad), "--bundle", str(bundle_dir)])
    assert result.exit_code == 2 and "is not a peftx-device-report" in result.output


# --- what decides the figures, read from the device's own files --------------------------------------------------


def test_jetson_gpu_clock_and_arm_cpu_flags_from_their_files(tmp_path):
    bench = _module(TEMPLATE, "device_bench_facts")
    devfreq = tmp_path / "sys/class/devfreq"
    (devfreq / "17000000.ga10b").mkdir(parents=True)
    (devfreq / "3d00000.pcie").mkdir(parents=True)  # not the GPU
    for field, value in (("cur_freq", "918000000"), ("max_freq", "1300500000"), ("governor", "nvhost_podgov")):
        (devfreq / "17000000.ga10b" / field).write_text(value + "\n")
    (devfreq / "3d00000.pcie" / "cur_freq").write_text("1\n")
    freq = bench.gpu_frequency(tmp_path)
    assert freq["cur_freq"] == 918000000 and freq["max_freq"] == 1300500000 and freq["unit"] == "Hz"
    assert freq["governor"] == "nvhost_podgov" and freq["source"].endswith("17000000.ga10b")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(
        "processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\n"
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp lrcpc i8mm\n"
    )
    cpu = bench.cpu_facts(tmp_path)
    assert cpu["model"] == "ARMv8 Processor rev 1 (v8l)"
    assert cpu["flags"]["asimddp"] and cpu["flags"]["i8mm"] and not cpu["flags"]["avx2"]


def test_bench_times_engines_through_tensorrt(bundle_dir):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here: engines are timed on the device")
    infer = _module(bundle_dir / "infer.py", "infer_for_engines")
    if not infer.tensorrt_usable():
        pytest.skip("TensorRT needs cuda-python and a GPU")
    pytest.skip("needs an engine built by build_engine.sh on this machine (trtexec)")


# --- build_engine.sh all, against the stand-in trtexec of trtexec_stand_in.py ----------------------------------

SLOW_STAND_IN = """#!/usr/bin/env bash
# the stand-in, slowed down (a build that takes a while) and logging every call
sleep "${STUB_SLEEP:-0}"
printf '%s ' "$@" >> "$STUB_ALL"; echo >> "$STUB_ALL"
case " $* " in *" --help "*) ;; *) [ -n "${STUB_FAIL:-}" ] && { echo "[E] stand-in build failure" >&2; exit 1; } ;; esac
exec "$(dirname "$0")/trtexec-stand-in" "$@"
"""


def _build_all(bundle: Path, bin_dir: Path, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_ALL": str(tmp / "all.txt"),
        "NV_TEGRA_RELEASE": str(tmp / "no-such-file"),
        **env,
    }
    return subprocess.run(
        ["bash", str(bundle / "build_engine.sh"), "all"], env=full, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None, reason="needs bash, coreutils")
def test_build_engine_all_builds_every_precision_with_one_timing_cache(bundle_dir, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    install_trtexec(bin_dir, "10.3", name="trtexec-stand-in")  # TensorRT 10.3's option parser (test_build_engine.py)
    (bin_dir / "trtexec").write_text(SLOW_STAND_IN)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    work = Path(shutil.copytree(bundle_dir, tmp_path / "b"))
    done = _build_all(work, bin_dir, tmp_path, STUB_SLEEP="1.5", BUILD_PROGRESS_S="0.5")
    assert done.returncode == 0, done.stderr
    err = done.stderr.splitlines()
    assert err[0].startswith("+ building 3 engines (fp32 fp16 int8) with one timing cache: no estimate yet")
    assert [line.split(" (")[0] for line in err if line.startswith("+ [") and "->" in line] == [
        "+ [1/3] fp32 -> model_fp32.engine",
        "+ [2/3] fp16 -> model_fp16.engine",
        "+ [3/3] int8 -> model_int8.engine",
    ]
    assert "s left)" in next(line for line in err if line.startswith("+ [2/3] fp16 ->"))  # estimate after one
    assert any(line.startswith("+ [1/3] fp32 still building:") for line in err)  # progress while trtexec works
    builds = [line.split() for line in (tmp_path / "all.txt").read_text().splitlines() if "--help" not in line]
    assert [b[0] for b in builds] == ["--onnx=model.onnx", "--onnx=model.onnx", "--onnx=model_int8.onnx"]
    assert all("--timingCacheFile=timing.cache" in b for b in builds)  # ONE cache, reused by every build
    for precision in ("fp32", "fp16", "int8"):
        engine = work / f"model_{precision}.engine"
        manifest = json.loads((work / f"model_{precision}.engine.json").read_text())
        assert manifest["engine"] == engine.name and manifest["precision"] == precision
        assert manifest["engine_sha256"] == sha256_file(engine)
    assert not (work / "model.engine").exists()
    again = _build_all(work, bin_dir, tmp_path)
    assert again.returncode == 0 and re.match(
        r"\+ building 3 engines \(fp32 fp16 int8\) with one timing cache: about 0 min [0-9]+ s \(this device's last",
        again.stderr.splitlines()[0],
    )
    # infer.py --bench finds every engine with its manifest; without TensorRT here they are skipped, and say so
    bench = run_infer(work, "--bench", "--duration", "0.1", "--batch", "1", "--backend", "tensorrt")
    assert bench.returncode == 0, bench.stderr
    report = json.loads((work / "device_report.json").read_text(encoding="utf-8"))
    assert [(a["precision"], a["file"]) for a in report["artifacts"]] == [
        ("fp32", "model_fp32.engine"),
        ("fp16", "model_fp16.engine"),
        ("int8", "model_int8.engine"),
    ]
    assert all(a["skipped"] == "needs tensorrt, cuda-python and a GPU" for a in report["artifacts"])
    failed = _build_all(Path(shutil.copytree(bundle_dir, tmp_path / "c")), bin_dir, tmp_path, STUB_FAIL="1")
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith("build_engine.sh: stopped at fp32 (built before it: none)")


def test_jetson_power_mode_and_clocks_are_recorded_or_said_unknown(tmp_path, monkeypatch):
    """On a Jetson (its /etc/nv_tegra_release and device-tree model), the power mode from `nvpmodel -q` (a stand-in
    printing what the tool prints) and jetson_clocks' state — here without it installed: said, not guessed."""
    bench = _module(TEMPLATE, "device_bench_jetson")
    infer = _module(TEMPLATE.with_name("infer.py"), "infer_for_jetson")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\0")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvpmodel").write_text("#!/bin/sh\nprintf 'NV Fan Mode:quiet\\nNV Power Mode: 15W\\n0\\n'\n")
    (bin_dir / "nvpmodel").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    state = bench.jetson_state(infer, tmp_path)
    assert state["model"] == "NVIDIA Jetson Orin Nano Developer Kit" and state["l4t"] == "36.4.3"
    assert state["power_mode"] == "15W" and state["nvpmodel"]["available"]
    assert not state["jetson_clocks"]["available"] and state["jetson_clocks"]["error"] == "jetson_clocks not found"
    summary = device_report.device_summary({"jetson": state, "gpu": {"frequency": bench.gpu_frequency(tmp_path)}})
    assert summary["Jetson"] == "NVIDIA Jetson Orin Nano Developer Kit (L4T 36.4.3), power mode 15W"
    assert summary["jetson_clocks"] == "unknown (jetson_clocks not found)"
    assert bench.jetson_state(infer, tmp_path / "elsewhere") is None  # not a Jetson: no Jetson section
