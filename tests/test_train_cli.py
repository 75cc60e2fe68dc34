"""`peftx train` for a new user: short runs just work, and the run says what it will do and what it will cost before
it does it (the effective configuration before the first step, a time estimate after the first steps)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_cli_errors import TRAIN_MODEL, tiny_run, write_digit_folder, write_train_weights
from typer.testing import CliRunner

from peftx.cli.app import app


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train_cli")
    return write_train_weights(root / "w.safetensors"), write_digit_folder(root / "digits")


def _train(weights: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *tiny_run(weights, data), "--output", str(out), *extra]


def test_a_two_epoch_run_on_own_data_scales_the_recipe_warmup_and_says_so(inputs, tmp_path) -> None:
    """The generic recipe's warm-up is 3 epochs; `--epochs 2` used to fail on it."""
    weights, data = inputs
    res = CliRunner().invoke(app, _train(weights, data, tmp_path / "run", "--epochs", "2"))
    assert res.exit_code == 0, res.stderr
    err = res.stderr
    # the effective configuration, before the first step
    assert f"rlrr on {TRAIN_MODEL}:" in err and "parameters trained" in err
    assert "data " + str(data) + ": 10 train / 5 val / 5 test images at 32 px, batch 4 (2 steps per epoch)" in err
    assert "schedule: 2 epochs, AdamW lr 0.001, warm-up 0.2 from 1e-07, cosine to 1e-08, cool-down 0" in err
    assert "note: warm-up 3 -> 0.2 epochs: the recipe's 3 of 30, scaled to this 2-epoch run" in err
    assert "device cpu, AMP off, 1 process; run directory" in err
    assert err.index("schedule:") < err.index("estimate: about")  # config first, then the estimate
    assert "estimate: about" in err and "steps x" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["warmup_epochs"] == pytest.approx(0.2) and summary["notes"]


def test_fractional_warmup_is_accepted(inputs, tmp_path) -> None:
    weights, data = inputs
    res = CliRunner().invoke(
        app, _train(weights, data, tmp_path / "run", "--epochs", "1", "--warmup-epochs", "0.5", "--json")
    )
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["config"]["warmup_epochs"] == 0.5 and summary["notes"] == []
    assert res.stderr == ""  # --json: nothing but the result


def test_cli_long_run_estimate_says_how_to_shorten_it() -> None:
    from peftx.cli.render import LONG_RUN_S, estimate_lines

    fields = dict(
        seconds_per_step=1.5,
        measured_steps=2,
        steps_remaining=1000,
        train_seconds=1500.0,
        eval_seconds=100.0,
        total_seconds=1600.0,
    )
    lines = estimate_lines(fields)
    assert lines[0] == (
        "estimate: about 27 min to go (1,000 steps x 1.50 s, measured on 2 step(s), + about 2 min of evaluation)"
    )
    assert fields["total_seconds"] > LONG_RUN_S and "--epochs N and --img-size PX shorten it" in lines[1]
    assert len(estimate_lines(dict(fields, total_seconds=60.0))) == 1


@pytest.mark.parametrize("width", [80, 100])
def test_own_folder_without_val_the_output_says_what_it_did_and_fits(inputs, tmp_path, monkeypatch, width) -> None:
    """No val/: the drawn split and the skipped stray file are said before the first step; the summary, per-class
    and confusion tables fit the terminal, with no raw floats."""
    import shutil

    from cli_render import assert_fits

    from peftx.cli import output

    weights, digits = inputs
    data = tmp_path / "data"
    shutil.copytree(digits / "train", data / "train")
    shutil.copytree(digits / "test", data / "test")
    (data / "train" / "3" / "notes.txt").write_text("stray")
    monkeypatch.setattr(output.console, "width", width)
    res = CliRunner().invoke(app, _train(weights, data, tmp_path / "run", "--epochs", "1"))
    assert res.exit_code == 0, res.stderr
    assert (
        "validation: 5 images drawn from train/ (no val/ folder): 20% of each class, at most 100, seed 42" in res.stderr
    )
    assert "skipped 1 non-image file in the dataset (notes.txt)" in res.stderr
    out = res.stdout
    for heading in (
        "training run",
        "selected epoch",
        "test accuracy",
        "per class (test)",
        "confusion (test)",
        "true \\ predicted",
    ):
        assert heading in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert_fits(out, width, [summary["run_dir"], *(r["class"] for r in summary["per_class"])])
    assert f"{100 * summary['test_accuracy']:.2f} %" in out

    ev = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--split", "val"])
    assert ev.exit_code == 0, ev.stderr
    assert f"{100 * summary['val_accuracy']:.2f} % of 5 images" in ev.stdout
    assert_fits(ev.stdout, width)


@pytest.mark.slow
def test_without_a_terminal_each_epoch_is_a_line_written_as_it_ends(inputs, tmp_path) -> None:
    """`peftx train > log 2>&1`, nohup, CI: no terminal, so no bars; one plain line per epoch (epoch, losses, val
    accuracy, time left), flushed when the epoch ends, not a bar drawn once when the process exits. A real process
    whose stderr is a pipe, read line by line while it runs."""
    import re
    import subprocess
    import sys
    import time

    weights, data = inputs
    run, epochs = tmp_path / "run", 4
    argv = [sys.executable, "-m", "peftx.cli.app", *_train(weights, data, run, "--epochs", str(epochs))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pattern = re.compile(
        r"^epoch (\d+)/(\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4}), val accuracy (\d+\.\d) % "
        r"\(best \d+\.\d % @ \d+\), \d+\.\d s, about \d+ (s|min|h) left$"
    )
    seen: list[tuple[int, bool, bool]] = []  # (epoch, summary.json written yet, process still running)
    lines: list[str] = []
    assert proc.stderr is not None
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        m = pattern.match(lines[-1])
        if m:
            seen.append((int(m.group(1)), (run / "summary.json").exists(), proc.poll() is None))
            assert int(m.group(2)) == epochs
        assert time.monotonic() < deadline, "the run took too long"
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "\n".join(lines)
    assert [e for e, _, _ in seen] == list(range(1, epochs + 1)), "\n".join(lines)
    # the first epoch's line arrived while the run still had epochs and its test to go: written as it happened
    assert seen[0][1:] == (False, True), "\n".join(lines)
    assert not any("\x1b[" in line for line in lines)  # no terminal control codes: no live display
    assert lines[0].startswith("· rlrr on ") and "training run" in out
