"""`peftx compare`: runs that differ only in method, failures as rows, interrupt / resume / skip, seeds.

Real runs throughout: tiny timm ViTs (a real weights file) trained on real digit PNGs, each run in its own worker
process exactly as the command does it; the interrupt test sends a real SIGINT to the real console script.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_training, write_digit_folder

from peftx.compare import (
    COMPARE_FILE,
    RUN_RECORD,
    CompareConfig,
    compare,
    config_differences,
    decide_action,
    parse_set,
    plan_runs,
)
from peftx.compare_report import WIDTH, format_table
from peftx.errors import OutputError, UsageError
from peftx.train import TrainConfig

pytestmark = pytest.mark.slow  # whole comparison runs: make test-fast skips the module

SHARED = tiny_training()


# The CLI builds timm's own configs (no model_kwargs): timm's 6-block, 64-wide test ViT at 32 px (4 tokens).
CLI_MODEL, CLI_IMG = "test_vit", 32


def write_cli_weights(path: Path) -> Path:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(CLI_MODEL, pretrained=False, num_classes=0, img_size=CLI_IMG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_compare(out: Path, weights: Path, data: Path, **kw: Any) -> CompareConfig:
    train = dict(SHARED, weights=str(weights), **kw.pop("train", {}))
    return CompareConfig(output=str(out), data=str(data), train=train, **kw)


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **f: Any) -> None:
        self.seen.append((event, f))

    def started(self) -> list[tuple[str, str]]:
        return [(f["method"], f["action"]) for e, f in self.seen if e == "run_start"]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread_workers():
    """Worker processes with one OpenMP thread: on 2 cores shared with other jobs, two spinning OpenMP threads per
    worker made a tiny RLRR step 50x slower (measured: 79 s vs 1.6 s for the interrupt test's run)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_weights, digit_folder):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    events = Events()
    result = compare(tiny_compare(out, tiny_weights, digit_folder, methods=["rlrr", "aoft", "lora"]), events)
    return out, result, events


@pytest.mark.slow
def test_runs_differ_only_in_method(compared) -> None:
    out, result, _ = compared
    rows = {r["method"]: r for r in result["runs"]}
    assert [r["status"] for r in rows.values()] == ["ok"] * 3, [r.get("reason") for r in rows.values()]
    summaries = {m: json.loads((out / m / "seed7" / "summary.json").read_text()) for m in rows}
    configs = {m: s["config"] for m, s in summaries.items()}
    ref = configs["rlrr"]
    for m, c in configs.items():
        differing = {k for k in ref if ref[k] != c[k]}
        assert differing <= {"method", "output"}, (m, differing)
        assert c["method"] == m and c["method_options"] == {}
    assert result["differing_fields"] == [] == config_differences(result["runs"])
    # The same schedule and data, epoch by epoch: steps, learning rates and split sizes agree; the losses do not
    # (the methods really are different).
    metrics = {m: _lines(out / m / "seed7" / "metrics.jsonl") for m in rows}
    for m in metrics:
        assert [(r["epoch"], r["global_step"], r["lr"]) for r in metrics[m]] == [
            (r["epoch"], r["global_step"], r["lr"]) for r in metrics["rlrr"]
        ], m
        assert summaries[m]["steps_per_epoch"] == summaries["rlrr"]["steps_per_epoch"]
        assert summaries[m]["test_images"] == summaries["rlrr"]["test_images"] > 0
        assert summaries[m]["data_source"] == summaries["rlrr"]["data_source"]
    assert len({metrics[m][0]["train_loss"] for m in metrics}) == 3
    assert len({s["trainable_params"] for s in summaries.values()}) == 3


def test_config_differences_flags_anything_but_the_method(compared) -> None:
    import copy

    _, result, _ = compared
    rows = copy.deepcopy(result["runs"])
    assert config_differences(rows) == []
    rows[1]["config"]["seed"] += 1  # aoft trained with another seed than the others of "seed 7"
    rows[2]["config"]["batch_size"] = 4
    assert config_differences(rows) == ["batch_size", "seed"]
    other_seed = copy.deepcopy(result["runs"][:1])[0]
    other_seed["seed"] = other_seed["config"]["seed"] = 8  # a second seed of rlrr: its seed may differ
    assert config_differences(result["runs"] + [other_seed]) == []


@pytest.mark.slow
def test_table_json_and_chart(compared) -> None:
    out, result, _ = compared
    text = format_table(result)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= WIDTH
    saved = json.loads((out / COMPARE_FILE).read_text())
    assert saved["state"] == "done" and [e["method"] for e in saved["summary"]] == ["rlrr", "aoft", "lora"]
    for entry in saved["summary"]:
        row = next(line for line in lines if line.startswith(entry["method"] + " "))
        assert f"{100 * entry['test_accuracy']:.2f}" in row
        assert f"{entry['trainable_params']:,}" in row
        size = (out / entry["method"] / "seed7" / "adapter.safetensors").stat().st_size
        assert entry["adapter_bytes"] == size
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # The merged latency: timed once, because all three runs merged into one graph.
    latency = saved["latency"]
    assert latency["same_graph"] and len(latency["graphs"]) == 1
    assert sorted(latency["graphs"][0]["runs"]) == sorted(r["run_dir"] for r in saved["runs"])
    assert latency["graphs"][0]["timings"][0]["median_ms"] > 0
    assert sum("Merged model:" in line for line in lines) == 1


@pytest.mark.slow
def test_each_run_directory_is_an_ordinary_run(compared, tmp_path) -> None:
    from peftx.deploy import merge_export

    out, _, _ = compared
    report = merge_export(
        out / "lora" / "seed7", output=tmp_path / "bundle", batch=(1, 2, 4), tensorrt="off", simplify=False
    )
    assert report.status == "ok"


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_refuses_other_settings(compared, tiny_weights, digit_folder) -> None:
    out, result, _ = compared
    before = {m: (out / m / "seed7" / "summary.json").read_bytes() for m in ("rlrr", "aoft", "lora")}
    events = Events()
    again = compare(
        tiny_compare(out, tiny_weights, digit_folder, methods=["rlrr", "aoft", "lora"], latency=False), events
    )
    assert events.started() == []  # nothing trained
    assert [r["action"] for r in again["runs"]] == ["skip"] * 3
    assert {m: (out / m / "seed7" / "summary.json").read_bytes() for m in before} == before
    assert [e["test_accuracy"] for e in again["summary"]] == [e["test_accuracy"] for e in result["summary"]]
    with pytest.raises(OutputError, match="epochs"):
        compare(tiny_compare(out, tiny_weights, digit_folder, methods=["rlrr"], train=dict(epochs=3)))


@pytest.mark.slow
def test_failing_methods_are_rows_with_their_reason(tmp_path, tiny_weights, digit_folder) -> None:
    out = tmp_path / "cmp"
    # Three ways a method fails: not registered; unsupported on this backbone (rank above the layer's size: the
    # error comes from adapt() in the worker); diverging (the loss becomes non-finite).
    cfg = tiny_compare(
        out,
        tiny_weights,
        digit_folder,
        methods=["nope", "lora", "rlrr"],
        latency=False,
        per_method={"lora": {"r": 100_000}, "rlrr": {"lr": 1e30}},
    )
    result = compare(cfg)
    rows = {r["method"]: r for r in result["runs"]}
    assert {m: r["status"] for m, r in rows.items()} == {"nope": "failed", "lora": "failed", "rlrr": "failed"}
    assert "unknown method 'nope'" in rows["nope"]["reason"]
    assert "r=100000 exceeds" in rows["lora"]["reason"] and rows["lora"]["error_type"] == "UsageError"
    assert "training loss became non-finite" in rows["rlrr"]["reason"]
    assert rows["rlrr"]["error_type"] == "NonFiniteError"
    assert not any(r["reason"].startswith("internal error") for r in rows.values())  # the errors' own messages
    text = format_table(result)
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    for i, m in enumerate(("nope", "lora", "rlrr"), start=1):
        assert f"[{i}] {m} seed 7: failed:" in text
    # Kept as rows on a re-run (nothing retrained); retry_failed trains them again.
    events = Events()
    again = compare(cfg, events)
    assert events.started() == [] and [r["action"] for r in again["runs"]] == ["invalid", "failed", "failed"]
    assert [decide_action(p, force=False, retry_failed=True) for p in plan_runs(cfg)] == ["invalid", "new", "new"]


@pytest.mark.slow
def test_seeds_report_mean_and_spread(tmp_path, tiny_weights, digit_folder) -> None:
    out = tmp_path / "cmp"
    result = compare(tiny_compare(out, tiny_weights, digit_folder, methods=["aoft"], seeds=2, latency=False))
    runs = result["runs"]
    assert [r["seed"] for r in runs] == [7, 8] and all(r["status"] == "ok" for r in runs)
    assert {k for k in runs[0]["config"] if runs[0]["config"][k] != runs[1]["config"][k]} == {"seed", "output"}
    acc = [r["test_accuracy"] for r in runs]
    entry = result["summary"][0]
    assert entry["test_accuracy"] == pytest.approx(statistics.fmean(acc))
    assert entry["test_accuracy_sd"] == pytest.approx(statistics.stdev(acc))
    assert (entry["test_accuracy_min"], entry["test_accuracy_max"]) == (min(acc), max(acc))
    row = next(line for line in format_table(result).splitlines() if line.startswith("aoft "))
    assert f"{100 * statistics.fmean(acc):.2f} ± {100 * statistics.stdev(acc):.2f}" in row


@pytest.mark.slow
def test_interrupt_keeps_finished_runs_and_rerun_resumes(tmp_path) -> None:
    """A real SIGINT to `peftx compare`: the running trainer checkpoints, the finished run stays; the same command
    again skips the finished run and resumes the interrupted one from its checkpoint."""
    from test_cli_errors import tiny_run
    from test_interrupts import clean_env, console_script, sigint_once

    script = console_script()
    weights = write_cli_weights(tmp_path / "test_vit.safetensors")
    data = write_digit_folder(tmp_path / "digits", per_split={"train": 4, "val": 1, "test": 1})
    out = tmp_path / "cmp"
    options = ["--epochs", "12", "--warmup-epochs", "0", "--amp", "off", "--no-latency", "--output", str(out), "--json"]
    argv = [script, "compare", "--methods", "rlrr,lora", *tiny_run(weights, data, CLI_MODEL, CLI_IMG), *options]
    lora_ckpt = out / "lora" / "seed42" / "checkpoint" / "last.safetensors"  # lora is under way
    env = dict(clean_env(), OMP_NUM_THREADS="1")
    returncode, stdout, stderr = sigint_once(argv, lora_ckpt, env)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 130, stderr
    assert len(lines) == 1 and lines[0].startswith("peftx: error: comparison interrupted by SIGINT at lora"), stderr
    assert "re-run the same command" in lines[0] and stdout.strip() == ""
    rlrr_summary = (out / "rlrr" / "seed42" / "summary.json").read_bytes()
    assert not (out / "lora" / "seed42" / "summary.json").exists() and lora_ckpt.exists()
    record = json.loads((out / "lora" / "seed42" / RUN_RECORD).read_text())
    assert record["status"] == "interrupted"
    saved = json.loads((out / COMPARE_FILE).read_text())
    assert saved["state"] == "interrupted" and [r["status"] for r in saved["runs"]] == ["ok", "interrupted"]
    done_epochs = len(_lines(out / "lora" / "seed42" / "metrics.jsonl"))
    assert 1 <= done_epochs < 12

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert [(r["method"], r["action"], r["status"]) for r in result["runs"]] == [
        ("rlrr", "skip", "ok"),
        ("lora", "resume", "ok"),
    ]
    assert (out / "rlrr" / "seed42" / "summary.json").read_bytes() == rlrr_summary
    lora = json.loads((out / "lora" / "seed42" / "summary.json").read_text())
    assert lora["resumed"] is True and lora["epochs"] == 12
    assert len(_lines(out / "lora" / "seed42" / "metrics.jsonl")) == 12


# -- configuration (no training) ---------------------------------------------------------------------------------


def test_parse_set() -> None:
    assert parse_set(["full.lr=1e-4", "lora.r=4", "lora.targets=q,v", "aoft.init=zeros"]) == {
        "full": {"lr": 1e-4},
        "lora": {"r": 4, "targets": ["q", "v"]},
        "aoft": {"init": "zeros"},
    }
    for bad in ("lr=1e-4", "full.lr", ".lr=1", "full.=1"):
        with pytest.raises(UsageError, match="METHOD.FIELD=VALUE"):
            parse_set([bad])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(per_method={"lora": {"batch_size": 4}}), "batch_size is shared by every method"),
        (dict(per_method={"lora": {"epochs": 4}}), "epochs is shared by every method"),
        (dict(per_method={"full": {"lr": 1e-4}}), "not compared"),
        (dict(train={"method": "lora"}), "compare sets method"),
        (dict(methods=["lora", "lora"]), "twice"),
        (dict(methods=["../x"]), "not a plain name"),
        (dict(seeds=0), "seeds"),
    ],
)
def test_bad_comparisons_are_refused_before_anything_runs(tmp_path, kw, match) -> None:
    base = dict(output=str(tmp_path / "cmp"), methods=["rlrr", "lora"])
    with pytest.raises(UsageError, match=match):
        compare(CompareConfig(**{**base, **kw}))
    assert not (tmp_path / "cmp").exists()


def test_learning_rate_precedence(tmp_path) -> None:
    """set > shared --lr > the recipe's (scaled by the method's recipe_lr_scale: full fine-tuning's 0.01)."""
    from peftx.train.config import resolve

    plans = {p.method: p for p in plan_runs(CompareConfig(output=str(tmp_path), methods=["rlrr", "full"]))}
    assert (plans["full"].request["lr"], plans["full"].sources["lr"]) == (None, "recipe x method")
    assert (plans["rlrr"].request["lr"], plans["rlrr"].sources["lr"]) == (None, "recipe")
    lrs = {m: resolve(TrainConfig.from_dict(p.request)).config.lr for m, p in plans.items()}
    assert lrs["full"] == pytest.approx(lrs["rlrr"] * 0.01)
    shared = {
        p.method: p
        for p in plan_runs(CompareConfig(output=str(tmp_path), methods=["rlrr", "lora"], train={"lr": 2e-3}))
    }
    assert [(p.request["lr"], p.sources["lr"]) for p in shared.values()] == [(2e-3, "shared")] * 2
    own = plan_runs(
        CompareConfig(output=str(tmp_path), methods=["lora"], train={"lr": 2e-3}, per_method={"lora": {"lr": 1e-3}})
    )
    assert (own[0].request["lr"], own[0].sources["lr"]) == (1e-3, "set")


def test_default_methods_are_the_registered_ones() -> None:
    from peftx.compare import DEFAULT_METHODS, default_methods
    from peftx.methods import METHOD_NAMES

    assert default_methods() == [m for m in DEFAULT_METHODS if m in METHOD_NAMES]
    assert {"rlrr", "aoft", "lora"} <= set(default_methods())


@pytest.mark.parametrize(
    "args, code, start",
    [
        (["--set", "lr=1e-4"], 2, "peftx: error: --set 'lr=1e-4' is not METHOD.FIELD=VALUE"),
        (
            ["--methods", "rlrr,lora", "--set", "lora.batch_size=4"],
            2,
            "peftx: error: lora.batch_size: batch_size is shared",
        ),
        (["--seeds", "0"], 2, "peftx: error: Invalid value for '--seeds'"),
    ],
)
def test_cli_bad_options_are_one_line(tmp_path, args, code, start) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from peftx.cli.app import main; main(sys.argv[1:])",
            "compare",
            "--output",
            str(tmp_path / "cmp"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith(start), proc.stderr
    assert not (tmp_path / "cmp").exists()  # nothing written


def test_a_full_fine_tuning_row_is_printed_whole() -> None:
    """The widest row compare prints: full fine-tuning (21.5 M trainable, an 82 MiB adapter, lr from the recipe x
    the method's scale) — no cell cut, the lr source explained under the table."""
    entry = {
        "method": "full",
        "runs": 1,
        "ok": 1,
        "failures": [],
        "test_accuracy": 0.8585,
        "best_epochs": [16],
        "epochs": 20,
        "trainable_params": 21_540_490,
        "adapter_bytes": 86_179_888,
        "lr": 1e-05,
        "lr_source": "recipe x method",
        "train_seconds": 376.9,
        "img_per_s": 45.1,
        "peak_memory_mb": 1654.1,
    }
    text = format_table({"summary": [entry], "methods": ["full"], "seeds": [42], "shared": {}})
    row = next(line for line in text.splitlines() if line.startswith("full "))
    assert "…" not in text and "1e-05 rec*" in row and "21,540,490" in row
    assert "rec* = the recipe's x the method's recipe_lr_scale" in " ".join(text.split())
    assert max(len(line) for line in text.splitlines()) <= WIDTH
