"""Smoke tests of the benchmark suite on tiny models: every function runs and returns well-formed numbers.

No timing is asserted (these machines are shared); only shapes, signs, units and internal consistency.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import timm
import torch
import typer
from conftest import TINY_MODELS
from typer.testing import CliRunner

from peftx import bench
from peftx.bench import BenchConfig, ModelSpec, timing
from peftx.errors import UsageError

pytestmark = pytest.mark.slow  # the benchmark suites run for real: make test-fast skips the module


def _spec(family: str, key: str) -> ModelSpec:
    name, kw = TINY_MODELS[family]
    kw = dict(kw)
    size = kw.pop("img_size")
    return ModelSpec(
        key,
        name,
        f"tiny {family}",
        img_size=size,
        kwargs=tuple(kw.items()),
        ort_model_type="swin" if family == "swin" else "vit",
    )


SPECS = {"tiny_vit": _spec("vit", "tiny_vit"), "tiny_swin": _spec("swin", "tiny_swin")}


def _tiny_config(**overrides) -> BenchConfig:
    base = dict(
        models=("tiny_vit", "tiny_swin"),
        batches=(1, 3),
        methods=("rlrr", "lora", "aoft"),
        train_models=("tiny_vit",),
        export_models=("tiny_vit",),
        train_batch=4,
        min_rounds=2,
        max_rounds=2,
        budget_s=0.01,
        settle_s=0.0,
        train_rounds=2,
        train_budget_s=0.01,
        memory_steps=1,
        delta_reps=1,
        profile_steps=1,
        matmul_n=128,
        matmul_reps=2,
        isolate_memory=False,
        specs=SPECS,
        threads=1,
    )
    base.update(overrides)
    return BenchConfig(**base)


@pytest.fixture(scope="module")
def results():
    cfg = _tiny_config(suites=("inference", "training", "export", "profile"))
    messages: list[str] = []
    out = bench.run_benchmarks(cfg, progress=messages.append)
    assert messages, "progress callback was never called"
    return out


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


# ---------------------------------------------------------------- building blocks


def test_interleaved_timing_is_paired_and_respects_min_rounds():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = bench.interleaved_timing(fns, warmup=1, min_rounds=4, max_rounds=6, budget_s=0.0)
    assert set(times) == {"a", "b", "c"}
    assert all(len(v) == 4 for v in times.values())  # budget 0 -> min_rounds
    assert all(t >= 0 for v in times.values() for t in v)
    assert len(calls) == 3 * (1 + 4)
    rounds = [calls[i : i + 3] for i in range(3, len(calls), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every variant once per round


class _ScriptedGuard:
    def __init__(self, verdicts):
        self.verdicts = list(verdicts)

    def clean(self) -> bool:
        return self.verdicts.pop(0) if self.verdicts else True


def test_timed_rounds_discards_rounds_a_failed_probe_brackets():
    fns = {"a": lambda: None, "b": lambda: None}
    # probes: before r1 ok, after r1 FAIL (r1 dropped), after r2 ok (r2 dropped: its 'before' failed), then clean
    timing = bench.timed_rounds(
        fns,
        warmup=0,
        min_rounds=3,
        max_rounds=3,
        budget_s=0.0,
        guard=_ScriptedGuard([True, False, True]),
        max_wall_s=60,
    )
    assert timing.rounds == 3 and timing.discarded == 2 and not timing.contended
    assert all(len(v) == 3 for v in timing.times.values())
    # a machine that never gets quiet: every round is kept once the wall limit is hit, and the result is flagged
    noisy = bench.timed_rounds(
        fns, warmup=0, min_rounds=2, max_rounds=5, budget_s=0.0, guard=_ScriptedGuard([False] * 100), max_wall_s=0.0
    )
    assert noisy.contended and noisy.rounds >= 2 and all(len(v) == noisy.rounds for v in noisy.times.values())


def test_contention_guard_flags_a_multithreaded_probe_slower_than_factor_x_single(monkeypatch):
    guard = bench.ContentionGuard(2, reps=1, factor=2.0)
    best = {1: 1.0, 2: 0.6}  # seconds of the probe op with 1 and 2 threads
    monkeypatch.setattr(guard, "_best", lambda threads: best[threads])
    assert guard.clean()  # idle: two threads beat one
    best[2] = 2.5
    assert not guard.clean()  # another process holds a core: the 2-thread op waits for a descheduled thread
    best[1], best[2] = 3.0, 2.5
    assert not guard.clean()  # judged against the BEST single-thread time seen (1.0), not the latest one


def test_latency_stats_and_paired_ratio():
    st = bench.latency_stats([0.1, 0.2, 0.3], batch=4, flops_per_image=1e9)
    assert st["n"] == 3 and st["p50_ms"] == pytest.approx(200.0)
    assert st["p50_ms"] <= st["p90_ms"] <= st["p99_ms"]
    assert st["images_per_s"] == pytest.approx(20.0)
    assert st["gflops"] == pytest.approx(20.0)
    assert bench.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert math.isnan(bench.paired_ratio([], []))


def test_matmul_peaks_are_positive():
    p = bench.matmul_peak(64, reps=2, warmup=1)
    assert _finite_positive(p["gflops"]) and p["gflops"] >= p["median_gflops"] > 0
    o = bench.ort_matmul_peak(64, reps=2, warmup=1, threads=1)
    assert _finite_positive(o["gflops"])


def test_count_flops_counts_a_linear_exactly_and_vit_b16_matches_the_anchor():
    assert bench.count_flops(torch.nn.Linear(8, 4), (8,)) == 2 * 8 * 4
    with torch.device("meta"):  # shapes only: counting ViT-B/16 costs no memory or compute
        vit = timm.create_model("vit_base_patch16_224", exportable=True)
    gflop = bench.count_flops(vit, (3, 224, 224), device="meta") / 1e9
    assert gflop == pytest.approx(35.2, rel=0.01)  # timm / fvcore's figure for ViT-B/16: 17.6 GMACs


def test_contention_probe_and_threads():
    probe = bench.contention_probe(2, reps=2)  # the real op, timed with 1 and 2 threads
    assert _finite_positive(probe["ms_1_thread"]) and _finite_positive(probe["ms_2_threads"])
    assert probe["ratio"] == pytest.approx(probe["ms_2_threads"] / probe["ms_1_thread"])
    assert probe["contended"] is (probe["ratio"] > timing.CONTENDED_RATIO)
    # the verdict on given op times (the machine's facts injected): idle, two threads beat one; taken, they wait
    idle = bench.contention_probe(2, time_op={1: 1.0, 2: 0.6}.__getitem__)
    assert idle["ratio"] == pytest.approx(0.6) and idle["contended"] is False
    busy = bench.contention_probe(2, time_op={1: 1.0, 2: 12.0}.__getitem__)
    assert busy["ratio"] == pytest.approx(12.0) and busy["contended"] is True
    alone = bench.contention_probe(1, time_op={1: 5.0}.__getitem__)  # one thread: nothing to compare, never contended
    assert alone["ratio"] == 1.0 and alone["contended"] is False
    assert 1 <= bench.physical_cores() <= len(os.sched_getaffinity(0))


def test_config_validation():
    with pytest.raises(UsageError):
        _tiny_config(suites=("nope",)).validate()
    with pytest.raises(UsageError):
        _tiny_config(models=("not_a_model",)).validate()
    with pytest.raises(UsageError):
        _tiny_config(batches=(0,)).validate()
    with pytest.raises(UsageError):
        _tiny_config(train_methods=("full", "dora")).validate()
    assert bench.parse_list("1, 32", kind=int) == (1, 32)
    with pytest.raises(UsageError):
        bench.parse_list("1,x", kind=int)
    quick = BenchConfig.quick()
    assert quick.models == ("vit_s14",) and quick.quick_preset


def test_precision_options_are_validated():
    for bad in (dict(dtype="fp8"), dict(train_amp="int8"), dict(train_img_size=0), dict(train_amp="fp16")):
        with pytest.raises(UsageError):  # fp16 autocast is CUDA-only: refused on this CPU before anything runs
            _tiny_config(device="cpu", **bad).validate()
    cfg = _tiny_config(train_img_size=48)
    assert cfg.train_spec("tiny_vit").train_img_size == 48 and cfg.spec("tiny_vit").train_img_size is None


def test_bf16_autocast_training_step_and_bf16_peak():
    """--train-amp bf16: the step's forward really runs in bf16, the loss falls on a fixed batch, and the master
    tensors stay FP32; --dtype bf16: the peak is a bf16 GEMM."""
    setup = bench.train_setup(SPECS["tiny_vit"], "lora", batch=4, device=torch.device("cpu"), amp="bf16")
    assert setup.amp == torch.bfloat16 and setup.scaler is None
    seen = []
    hook = setup.model.head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    losses = [setup.step() for _ in range(8)]
    hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in setup.model.parameters())
    peak = bench.matmul_peak(64, reps=2, warmup=1, dtype=torch.bfloat16)
    assert peak["dtype"] == "bfloat16" and _finite_positive(peak["gflops"])


def test_compiled_and_bf16_inference_rows_are_checked_against_eager():
    """--dtype bf16 --compile eager: compiled plain / merged / unmerged rows next to the eager ones, each with a
    parity entry against its eager output at that batch, and the run's peak measured in bf16."""
    out = bench.run_benchmarks(
        _tiny_config(
            suites=("inference",),
            models=("tiny_vit",),
            methods=("rlrr",),
            onnxruntime=False,
            tensorrt="off",
            dtype="bf16",
            compile="eager",
        )
    )
    model = out["inference"][0]
    assert model["dtype"] == "bf16" and "bfloat16" in out["peak"]["basis"]
    for batch in (1, 3):
        keys = {(r["backend"], r["variant"]) for r in model["rows"] if r["batch"] == batch}
        assert {("compiled", "plain"), ("compiled", "merged"), ("compiled", "unmerged-rlrr")} <= keys
        for variant in ("plain", "merged", "unmerged-rlrr"):
            parity = model["parity"][f"compiled:{variant}@b{batch}"]
            assert parity["passed"] and parity["tolerance"] == "compiled_vs_eager", parity
    assert all(r["valid"] for r in model["rows"])
    assert any(r["ratio"] == "merged/plain" and r["backend"] == "compiled" for r in model["ratios"])


def test_a_variant_that_fails_to_compile_is_reported_and_not_timed(monkeypatch):
    """A bare GPU machine may lack what inductor needs (a C compiler for Triton): the compiled rows are dropped with
    a failed parity entry and a note, and the eager rows of the run are still measured."""

    class Broken:
        def __init__(self, *_a, **_k):
            pass

        def __call__(self, _x):
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(torch, "compile", Broken)
    out = bench.run_benchmarks(
        _tiny_config(
            suites=("inference",),
            models=("tiny_vit",),
            methods=("lora",),
            batches=(2,),
            onnxruntime=False,
            tensorrt="off",
            compile="inductor",
        )
    )
    model = out["inference"][0]
    assert {r["backend"] for r in model["rows"]} == {"eager"} and all(r["valid"] for r in model["rows"])
    failed = model["parity"]["compiled:merged@b2"]
    assert not failed["passed"] and "C compiler" in failed["failures"][0]
    assert any("compiled:unmerged-lora at batch 2 failed to compile" in n for n in model["notes"])


def test_delta_cost_per_method():
    for method in ("rlrr", "lora", "aoft"):
        setup = bench.train_setup(SPECS["tiny_vit"], method, batch=2, device=torch.device("cpu"))
        d = bench.delta_cost(setup.model, reps=1)
        assert d["layers"] > 0 and d["forward_backward_ms"] >= d["forward_ms"] > 0
        assert all(p.grad is None for p in setup.model.parameters())  # left clean for the step that follows


def test_training_setup_uses_the_trainers_parameter_groups():
    from peftx.train.optim import param_groups
    from peftx.train.recipes import GENERIC

    for method in ("rlrr", "aoft", "full"):
        setup = bench.train_setup(SPECS["tiny_vit"], method, batch=2, device=torch.device("cpu"))
        names = {id(p): n for n, p in setup.model.named_parameters()}
        decayed = {names[id(p)] for g in setup.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        groups, _ = param_groups(setup.model, GENERIC.weight_decay)
        assert decayed == {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        # the scales / generator vectors are 2-d but never decayed (a `p.ndim >= 2` rule decays them)
        assert not any(n.rsplit(".", 1)[-1] in ("s_col", "q_up", "q_down") for n in decayed), method
        assert all(g["weight_decay"] in (0.0, GENERIC.weight_decay) for g in setup.optimizer.param_groups)


def test_onnxruntime_runner_runs_with_the_benchmarks_session_options(tmp_path):
    import onnxruntime as ort

    from peftx.exports.onnx_export import export_onnx
    from peftx.exports.runners import OnnxRuntimeRunner

    spec = SPECS["tiny_vit"]
    path = tmp_path / "m.onnx"
    export_onnx(spec.build(3), path, input_size=(3, spec.img_size, spec.img_size))
    pinned = OnnxRuntimeRunner(path, session_options=bench.ort_session_options(1, level="basic"))
    with pinned:
        options = pinned._session.get_session_options()
        assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with OnnxRuntimeRunner(path) as default:  # the library's default: ONNX Runtime's own choices
        assert (
            default._session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )


def test_isolated_memory_worker_runs_in_a_subprocess():
    out = bench.run_memory_worker(True, SPECS["tiny_vit"], "lora", 2, 1, 1, "cpu", 0)
    assert out["method"] == "lora"
    assert out["peak_bytes"] > 0 and out["optimizer_state_bytes"] > 0
    assert len(out["isolated_step_s"]) == 1


# ---------------------------------------------------------------- whole run


def test_inference_rows_are_well_formed(results):
    peak = results["peak"]["gflops"]
    assert _finite_positive(peak)
    for model in results["inference"]:
        assert _finite_positive(model["gflop_per_image"])
        keys = {(r["batch"], r["backend"], r["variant"]) for r in model["rows"]}
        for batch in (1, 3):
            for variant in ("plain", "merged", "unmerged-rlrr", "unmerged-lora", "unmerged-aoft"):
                assert (batch, "eager", variant) in keys
            assert (batch, "ort", "plain") in keys and (batch, "ort", "merged") in keys
        for r in model["rows"]:
            assert r["n"] == 2 and len(r["times_ms"]) == 2
            assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
            assert _finite_positive(r["images_per_s"]) and _finite_positive(r["gflops"])
            assert r["pct_peak"] == pytest.approx(100 * r["gflops"] / peak)
        # parity is real: merged vs unmerged and ONNX Runtime vs PyTorch on real images
        for key in ("eager:merged", "ort:plain", "ort:merged"):
            assert model["parity"][key]["passed"], model["parity"][key]
        assert model["tensorrt"].startswith("skipped") or model["tensorrt"].startswith("measured")
        names = {(r["batch"], r["ratio"], r["backend"]) for r in model["ratios"]}
        assert (1, "merged/plain", "eager") in names and (3, "unmerged-lora/merged", "eager") in names
        assert all(_finite_positive(r["value"]) for r in model["ratios"])


def test_training_rows_are_well_formed(results):
    (model,) = results["training"]
    rows = {r["method"]: r for r in model["rows"]}
    assert set(rows) == {"full", "frozen", "lora", "rlrr", "aoft"}
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
    # the frozen reference trains the head only, yet back-propagates through every block
    assert 0 < rows["frozen"]["trainable_params"] < rows["lora"]["trainable_params"]
    assert rows["frozen"]["delta_cost"] is None
    for m in ("lora", "rlrr", "aoft"):
        r = rows[m]
        assert 0 < r["trainable_params"] < rows["full"]["trainable_params"]
        # AdamW keeps two moments (+ a step counter) per trainable tensor
        assert r["optimizer_state_bytes"] < rows["full"]["optimizer_state_bytes"]
        assert r["delta_cost"]["layers"] > 0
    assert rows["full"]["optimizer_state_bytes"] >= 2 * 4 * rows["full"]["trainable_params"]
    for r in rows.values():
        assert _finite_positive(r["step_ms_p50"]) and _finite_positive(r["step_gflop_per_image"])
        assert r["peak_bytes"] > 0
    # LoRA/AOFT skip the frozen weights' gradient GEMMs: fewer FLOPs per step than full fine-tuning
    assert rows["lora"]["step_gflop_per_image"] < rows["full"]["step_gflop_per_image"]
    # ... and the frozen reference's FLOPs are close to theirs: the activation-gradient GEMMs are all there (the
    # reference also back-propagates into block 0's input, which LoRA on q/v never needs: hence not exactly <=)
    assert 0.9 < rows["frozen"]["step_gflop_per_image"] / rows["lora"]["step_gflop_per_image"] < 1.1
    assert {r["method"] for r in model["ratios"]} == {"frozen", "lora", "rlrr", "aoft"}
    assert all(_finite_positive(r["step_time_vs_frozen"]) for r in model["ratios"])
    (prof,) = results["profile"]
    assert set(prof["profiles"]) == {"full", "frozen", "lora", "rlrr", "aoft"}
    assert all(p["top_ops"] and p["wall_ms_per_step"] > 0 for p in prof["profiles"].values())


def test_export_rows_and_targets(results):
    (model,) = results["export"]
    assert set(model["steps"]) == {"merge", "onnx_export", "simplify", "parity"}
    assert all(v >= 0 for v in model["steps"].values())
    assert model["parity"]["passed"] and model["onnx_mb"] > 0
    assert set(model["merge_s"]) == {"rlrr", "lora", "aoft"}
    # every verdict follows from its measured value
    targets = results["targets"]
    merged = [t for t in targets if t["target"].startswith("merged <=")]
    assert len(merged) == sum(1 for m in results["inference"] for r in m["ratios"] if r["ratio"] == "merged/plain")
    measured = {  # the unrounded ratios: the printed "1.020x" of a 1.0204 ratio is a miss
        f"{r['model']} b{r['batch']} {r['backend']}": r["value"]
        for m in results["inference"]
        for r in m["ratios"]
        if r["ratio"] == "merged/plain"
    }
    for t in merged:
        assert t["value"] == f"{measured[t['where']]:.3f}x"
        assert t["met"] == (measured[t["where"]] <= bench.MERGED_OVER_PLAIN_MAX), t
    (export,) = [t for t in targets if "export" in t["target"]]
    assert export["met"] == (model["merge_plus_export_s"] < bench.EXPORT_SECONDS_MAX)
    for t in (t for t in targets if t["target"].startswith("step time")):
        ratio = next(r for r in results["training"][0]["ratios"] if t["where"].endswith(r["method"]))
        assert t["met"] == (ratio["step_time_vs_full"] <= 1.0)


def test_results_serialise_and_render(results, tmp_path):
    paths = bench.write_results(results, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["environment"]["threads"] == 1
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = bench.result_tables(results)
    for title, columns, rows in tables:
        assert title and all(len(r) == len(columns) for r in rows)
    # the tables show the measured numbers, row for row
    for model in results["inference"]:
        ((_, columns, rows),) = [t for t in tables if t[0].startswith(f"Inference — {model['label']}")]
        shown = {(r[0], r[1], r[2]): r[columns.index("p50 ms")] for r in rows}
        for r in model["rows"]:
            assert shown[(str(r["batch"]), r["backend"], r["variant"])] == f"{r['p50_ms']:.1f}"
    ((_, columns, rows),) = [t for t in tables if t[0].startswith("Targets")]
    # this run keeps 2 timed rounds (like --quick): its timing verdicts are only indicative
    for row, t in zip(rows, results["targets"], strict=True):
        if t["rounds"] is not None:
            assert t["indicative"] and row[-1] == f"indicative ({'met' if t['met'] else 'not met'})", (row, t)
        else:
            assert row[-1] == ("met" if t["met"] else "NOT met")
    assert any(t["rounds"] is not None for t in results["targets"])
    assert any(t["rounds"] is None for t in results["targets"])  # memory and export: not from timed rounds


def test_verdicts_from_enough_rounds_are_plain_met_or_not(results):
    import copy

    full = copy.deepcopy(results)
    for model in full["inference"]:
        for t in model["timing"].values():
            t["rounds"] = bench.VERDICT_MIN_ROUNDS
    full["training"][0]["timing"]["rounds"] = bench.VERDICT_MIN_ROUNDS
    bench.finalize(full)
    ((title, _, rows),) = [t for t in bench.result_tables(full) if t[0].startswith("Targets")]
    assert title == "Targets" and {row[-1] for row in rows} <= {"met", "NOT met"}
    assert not any(t["indicative"] for t in full["targets"])


@pytest.mark.parametrize("width", [80, 100])
def test_tables_render_without_cut_cells(results, width):
    """Every table of the report through the CLI's renderer: nothing cut off with "…", no line wider than the
    terminal, and at 100 columns no word of any cell or header folded across lines."""
    from cli_render import assert_renders

    from peftx.cli.output import table

    for title, columns, rows in bench.result_tables(results):
        assert_renders(table(title, columns, rows), width, [*columns, *(c for r in rows for c in r)])


# ---------------------------------------------------------------- CLI


def _cli() -> typer.Typer:
    from peftx.cli.commands.bench_cmd import bench as bench_command

    app = typer.Typer()
    app.command()(bench_command)
    return app


def test_cli_rejects_bad_options(tmp_path):
    res = CliRunner().invoke(_cli(), ["--suite", "nope", "--output", str(tmp_path)])
    assert res.exit_code == 2 and "unknown suite" in res.output


def test_cli_json_run(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.MODELS, "tiny_vit", SPECS["tiny_vit"])
    res = CliRunner().invoke(
        _cli(),
        [
            "--suite",
            "inference",
            "--models",
            "tiny_vit",
            "--batch",
            "2",
            "--methods",
            "lora",
            "--budget",
            "0.1",
            "--min-rounds",
            "1",
            "--threads",
            "1",
            "--output",
            str(tmp_path),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["inference"][0]["model"] == "tiny_vit"
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.png").exists()
