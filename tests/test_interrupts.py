"""Interrupted commands, through the installed ``peftx`` console script in real processes.

* SIGKILL during ``peftx merge-export`` (at several points) never leaves a half bundle under the final name: the
  bundle directory either does not exist or is complete, hash-verified and status "ok". The ``.partial`` work
  directories a kill strands next to it are ignored by a later ``merge-export`` and by ``validate``.
* SIGINT during ``peftx train`` exits 130 with one line naming ``--resume``, and ``peftx train --resume RUN``
  completes the run. (Signals during training in depth, and resume == uninterrupted, are tests/test_resume.py's.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from safetensors.torch import save_file
from test_cli_errors import (
    CLASSES,
    make_tiny_run,
    tiny_run,
    write_digit_folder,
    write_train_weights,
)
from typer.testing import CliRunner

from peftx.cli.app import app
from peftx.deploy import merge_export
from peftx.exports.bundle import METADATA_FILE, read_bundle, verify_artifacts

BUNDLE_FILES = {
    "model.onnx",
    "model_fp16.onnx",
    "infer.py",
    "build_engine.sh",
    METADATA_FILE,
    "parity.json",
    "trt_readiness.json",
}


def console_script() -> str:
    script = Path(sys.executable).parent / "peftx"
    if not script.exists():
        pytest.skip("the peftx console script is not installed next to this interpreter")
    return str(script)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PEFTX_DEBUG"}


def sigint_once(argv: list[str], marker: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``argv``, send it SIGINT once ``marker`` exists (the work is under way; fail if it ends first or takes over
    300 s); its (return code, stdout, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    while proc.poll() is None and not marker.exists() and time.monotonic() - t0 < 300:
        time.sleep(0.01)
    if proc.poll() is not None:
        _, err = proc.communicate()
        pytest.fail(f"{argv[1]} ended (rc {proc.returncode}) before it could be interrupted:\n{err[-2000:]}")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.partial"))


def assert_absent_or_complete(out: Path) -> str:
    """The only two states a bundle directory may be seen in. Returns which."""
    if not out.exists():
        return "absent"
    assert out.is_dir()
    names = {p.name for p in out.iterdir()}
    assert BUNDLE_FILES <= names, f"half bundle under the final name: {sorted(names)}"
    meta = read_bundle(out)
    assert meta["status"] == "ok"
    verify_artifacts(out, meta)  # every artifact present with the sha256 metadata.json records
    return "complete"


@dataclass
class Kill:
    label: str
    after_work_dir_s: float | None  # seconds after the .partial work dir appears; None: kill at start_s after launch
    start_s: float = 0.0
    force: bool = False  # re-export over an existing bundle with --force
    # filled in by the run:
    saw_work_dir: bool = False
    returncode: int | None = None
    outcome: str = ""
    leftovers: list[str] = field(default_factory=list)


def _run_and_kill(script: str, run: Path, out: Path, kill: Kill) -> None:
    argv = [script, "merge-export", str(run), "--output", str(out), "--batch", "1:2:4", "--tensorrt", "off", "--json"]
    if kill.force:
        argv.append("--force")
    before = set(partials(out))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    t0 = time.monotonic()
    try:
        if kill.after_work_dir_s is None:
            time.sleep(kill.start_s)
        else:
            while proc.poll() is None and not (set(partials(out)) - before) and time.monotonic() - t0 < 120:
                time.sleep(0.01)
            kill.saw_work_dir = bool(set(partials(out)) - before) or out.exists()
            deadline = time.monotonic() + kill.after_work_dir_s
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        kill.returncode = proc.wait(timeout=120)


@pytest.mark.slow
def test_sigkill_during_export_never_leaves_a_half_bundle(tmp_path):
    script = console_script()
    base_weights = tmp_path / "base.safetensors"
    plain = make_tiny("vit")
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(base_weights))
    run = make_tiny_run(tmp_path, "run", base_weights, write_digit_folder(tmp_path / "digits"), seed=1)

    # an existing, complete bundle for the --force case
    forced_out = tmp_path / "forced" / "bundle"
    merge_export(run, output=forced_out, batch=(1, 2, 4), tensorrt="off")
    kills = [
        Kill("while the interpreter starts", None, start_s=1.0),
        Kill("as the work directory appears", 0.0),
        Kill("1 s into the export", 1.0),
        Kill("2.5 s into the export", 2.5),
        Kill("--force over a bundle, 1.5 s in", 1.5, force=True),
    ]
    outs = [tmp_path / f"k{i}" / "bundle" if not k.force else forced_out for i, k in enumerate(kills)]
    threads = [
        threading.Thread(target=_run_and_kill, args=(script, run, out, k)) for k, out in zip(kills, outs, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for k, out in zip(kills, outs, strict=True):
        assert k.returncode is not None
        k.outcome = assert_absent_or_complete(out)
        k.leftovers = [p.name for p in partials(out)] + [p.name for p in out.parent.glob(f".{out.name}.old-*")]
    assert any(k.saw_work_dir and k.returncode == -signal.SIGKILL for k in kills), (
        "no kill landed while a bundle was being written: the test proved nothing"
    )
    forced = kills[-1]  # killed mid re-export: the old bundle, the new one, or (a rename apart) moved aside
    assert forced.outcome == "complete" or any(".old-" in name for name in forced.leftovers)

    # Stranded .partial work dirs belong to dead writers: the next export next to them removes them and succeeds.
    stranded = [k for k, out in zip(kills, outs, strict=True) if partials(out)]
    target = next((out for out in outs if partials(out)), outs[1])
    left = partials(target)
    # ... but never the work dir of a writer that is still alive (this process stands in for one)
    live = target.parent / f".{target.name}.pid{os.getpid()}.x.partial"
    live.mkdir()
    runner = CliRunner()
    again = runner.invoke(
        app,
        [
            "merge-export",
            str(run),
            "--output",
            str(target),
            "--batch",
            "1:2:4",
            "--tensorrt",
            "off",
            "--json",
            "--force",
        ],
    )
    assert again.exit_code == 0, again.stderr
    assert assert_absent_or_complete(target) == "complete"  # an export left alone ends complete
    checked = runner.invoke(app, ["validate", str(target), "--tensorrt", "off", "--json"])
    assert checked.exit_code == 0, checked.stderr
    assert json.loads(checked.stdout)["passed"] is True
    assert partials(target) == [live]  # the dead writers' dirs are gone, the live one's kept
    live.rmdir()
    report = "; ".join(f"{k.label}: rc {k.returncode}, bundle {k.outcome}, leftovers {len(k.leftovers)}" for k in kills)
    print(
        f"SIGKILL during merge-export -> {report}; {len(stranded)} run(s) stranded a .partial dir "
        f"({len(left)} next to the re-exported bundle), removed by the next merge-export"
    )


@pytest.mark.slow
def test_sigint_during_train_exits_130_and_resume_completes(tmp_path):
    script = console_script()
    weights = write_train_weights(tmp_path / "vit_tiny.safetensors")
    data = write_digit_folder(tmp_path / "digits", per_split={"train": 4, "val": 1, "test": 1})
    run = tmp_path / "run"
    options = ["--epochs", "2", "--warmup-epochs", "0", "--method", "lora", "--json", "--output", str(run)]
    argv = [script, "train", *tiny_run(weights, data), *options]
    checkpoint = run / "checkpoint" / "last.safetensors"  # the first epoch-end checkpoint: training is under way
    returncode, stdout, stderr = sigint_once(argv, checkpoint, clean_env())
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 130, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("peftx: error: training interrupted by SIGINT"), lines[0]
    assert f"--resume {run}" in lines[0]
    assert "Traceback" not in stderr and stdout.strip() == ""
    assert checkpoint.exists() and not list(run.rglob("*.tmp"))

    resumed = CliRunner().invoke(app, ["train", "--resume", str(run), "--json"])  # in-process: saves a start-up
    assert resumed.exit_code == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed"] is True and summary["epochs"] == 2
    assert (run / "summary.json").exists() and (run / "adapter.safetensors").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert summary["config"]["method"] == "lora" and summary["test_images"] == len(CLASSES)
