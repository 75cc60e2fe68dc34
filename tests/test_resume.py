"""Resumable training: a run interrupted (SIGINT / SIGTERM, mid-epoch or at an epoch end) and resumed ends with the
same adapter, bit for bit, as the uninterrupted run; checkpoints hold no pickle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from peftx.adapter_io import read_adapter
from peftx.train.checkpoint import checkpoint_path, load_checkpoint
from peftx.errors import AdapterFileError, UsageError
from peftx.train import TrainConfig, TrainingInterrupted, train

from conftest import tiny_config



# Dropout and flip on: the resumed run must also reproduce the random numbers, not only the arithmetic.
RUN = dict(epochs=3, batch_size=8, lr=5e-3, warmup_epochs=1, dropout=0.2, hflip=True, method="lora",
           method_options={"r": 2})
STEPS_PER_EPOCH = 6  # 48 training images / batch 8


def _signal_at(sig: signal.Signals, event: str, **match):
    """A progress callback that sends ``sig`` to this process when ``event`` with these fields is emitted."""

    def on(name: str, **fields) -> None:
        if name == event and all(fields.get(k) == v for k, v in match.items()):
            os.kill(os.getpid(), sig)

    return on


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run).params


def _history(run: Path) -> list[dict]:
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr", "global_step")
    return [{k: r[k] for k in keys} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def uninterrupted(tiny_weights, digit_folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    summary = train(tiny_config(tiny_weights, run, data=str(digit_folder), **RUN))
    return run, summary


@pytest.mark.parametrize("sig, event, match", [
    (signal.SIGINT, "step", {"epoch": 2, "step": 3}),  # mid-epoch: skip 3 batches, restore the partial epoch
    (signal.SIGTERM, "epoch", {"epoch": 1}),  # during the epoch end: resume at the next epoch
], ids=["sigint-mid-epoch", "sigterm-epoch-end"])
def test_resume_equals_uninterrupted(uninterrupted, tiny_weights, digit_folder, tmp_path,
                                     sig, event, match) -> None:
    full_run, full_summary = uninterrupted
    run = tmp_path / "run"
    # what was installed before (SIG_IGN, not Python's default, when the test runs as a background job)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingInterrupted) as err:
        train(tiny_config(tiny_weights, run, data=str(digit_folder), **RUN), progress=_signal_at(sig, event, **match))
    assert err.value.exit_code == 130 and f"--resume {run}" in err.value.hint and sig.name in err.value.message
    state = load_checkpoint(run).state
    if event == "step":
        assert (state.epoch, state.batch, state.global_step) == (1, 3, STEPS_PER_EPOCH + 3)
    else:
        assert (state.epoch, state.batch) == (1, 0)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the trainer's handlers removed again

    summary = train(TrainConfig(resume=str(run)))
    assert summary["resumed"]
    full, resumed = _final(full_run), _final(run)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name  # bit-exact on CPU
    assert _history(run) == _history(full_run)
    _, best_full = read_adapter(full_run)
    _, best_resumed = read_adapter(run)
    assert all(torch.equal(best_full[k], best_resumed[k]) for k in best_full)
    for key in ("best_epoch", "val_accuracy", "test_accuracy"):
        assert summary[key] == full_summary[key], key


def test_sigint_from_outside_writes_a_resumable_checkpoint(tiny_weights, digit_folder, tmp_path) -> None:
    """A real SIGINT sent by another process while training runs in a fresh interpreter."""
    run, marker = tmp_path / "run", tmp_path / "stepped"
    cfg = tiny_config(tiny_weights, run, data=str(digit_folder), **dict(RUN, epochs=50))
    script = textwrap.dedent(f"""
        import sys, json
        from pathlib import Path
        from peftx.train import TrainConfig, TrainingInterrupted, train
        cfg = TrainConfig.from_dict(json.loads({json.dumps(json.dumps(cfg.to_dict()))}))
        def on(event, **f):
            if event == "step" and f["global_step"] == 2:
                Path({str(marker)!r}).write_text("x")
        try:
            train(cfg, progress=on)
        except TrainingInterrupted as e:
            print(e.message, file=sys.stderr)
            sys.exit(e.exit_code)
        sys.exit(0)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no step within 120 s"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted by SIGINT" in stderr
    ckpt = load_checkpoint(run)
    assert ckpt.state.global_step >= 2 and ckpt.state.epoch < 50
    # Resumable: the optimizer moments are there (a full resume is covered by test_resume_equals_uninterrupted).
    with safe_open(str(checkpoint_path(run)), framework="pt") as f:
        assert any(k.startswith("optim/") and k.endswith("/exp_avg") for k in f.keys())


def test_resume_keeps_hyperparameters_and_refuses_changes(uninterrupted, tmp_path) -> None:
    run, _ = uninterrupted
    with pytest.raises(UsageError, match="lr"):
        train(TrainConfig(resume=str(run), lr=0.5))
    with pytest.raises(UsageError, match="output"):
        TrainConfig(resume=str(run), output=str(tmp_path / "elsewhere"))


def test_checkpoint_is_safetensors_and_pickles_are_refused(uninterrupted, tmp_path) -> None:
    run, _ = uninterrupted
    path = checkpoint_path(run)
    assert path.read_bytes()[:8] != b"PK\x03\x04\x00\x00\x00\x00"
    ckpt = load_checkpoint(run)
    assert ckpt.state.epoch == 3 and ckpt.config["method"] == "lora"
    assert {"exp_avg", "exp_avg_sq", "step"} <= {k for v in ckpt.optimizer["tensors"].values() for k in v}
    bad = tmp_path / "bad" / "checkpoint" / "last.safetensors"
    bad.parent.mkdir(parents=True)
    torch.save({"param/x": torch.zeros(1)}, bad)
    with pytest.raises(AdapterFileError, match="pickle"):
        load_checkpoint(bad.parent.parent)
    with pytest.raises(AdapterFileError, match="no training checkpoint"):
        train(TrainConfig(resume=str(tmp_path / "missing")))
