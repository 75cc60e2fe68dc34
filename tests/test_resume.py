"""Resumable training: a run interrupted (SIGINT / SIGTERM, mid-epoch or at an epoch end) and resumed ends with the
same adapter, bit for bit, as the uninterrupted run; checkpoints hold no pickle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from peftx.adapter_io import read_adapter
from peftx.checks import is_pickle_file
from peftx.errors import AdapterFileError, UsageError
from peftx.events import Event
from peftx.train import TrainConfig, TrainingInterrupted, train
from peftx.train.checkpoint import checkpoint_path, load_checkpoint

# Dropout and flip on: the resumed run must also reproduce the random numbers, not only the arithmetic.
RUN = dict(
    epochs=3, batch_size=8, lr=5e-3, warmup_epochs=1, dropout=0.2, hflip=True, method="lora", method_options={"r": 2}
)
STEPS_PER_EPOCH = 6  # 48 training images / batch 8


def _signal_at(sig: signal.Signals, event: str, **match):
    """A progress callback that sends ``sig`` to this process when ``event`` with these fields is emitted."""

    def on(e: Event) -> None:
        fields = e.fields()
        if e.name == event and all(fields.get(k) == v for k, v in match.items()):
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


@pytest.mark.parametrize(
    "sig, event, match",
    [
        (signal.SIGINT, "step", {"epoch": 2, "step": 3}),  # mid-epoch: skip 3 batches, restore the partial epoch
        (signal.SIGTERM, "epoch", {"epoch": 1}),  # during the epoch end: resume at the next epoch
    ],
    ids=["sigint-mid-epoch", "sigterm-epoch-end"],
)
@pytest.mark.slow
def test_resume_equals_uninterrupted(uninterrupted, tiny_weights, digit_folder, tmp_path, sig, event, match) -> None:
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


@pytest.mark.slow
def test_sigint_from_outside_writes_a_resumable_checkpoint(tiny_weights, digit_folder, tmp_path) -> None:
    """A real SIGINT sent by another process while training runs in a fresh interpreter."""
    run, marker = tmp_path / "run", tmp_path / "stepped"
    cfg = tiny_config(tiny_weights, run, data=str(digit_folder), **dict(RUN, epochs=50))
    script = textwrap.dedent(f"""
        import sys, json
        from pathlib import Path
        from peftx.train import TrainConfig, TrainingInterrupted, train
        cfg = TrainConfig.from_dict(json.loads({json.dumps(json.dumps(cfg.to_dict()))}))
        def on(event):
            if event.name == "step" and event.global_step == 2:
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


def test_resume_refuses_every_given_option_that_differs_even_a_default_value(uninterrupted, digit_folder) -> None:
    run, _ = uninterrupted  # seed 7, lora r=2, trained on the PNG folder
    summary = (run / "summary.json").read_bytes()
    with pytest.raises(UsageError, match="seed: 42 differs from the resumed run's 7") as err:
        train(TrainConfig(resume=str(run), seed=42))  # 42 is the default: still refused
    assert "--seed" in err.value.hint
    with pytest.raises(UsageError, match="data: 'demo' differs from the resumed run's") as err:
        train(TrainConfig(resume=str(run), data="demo"))
    with pytest.raises(UsageError) as err:
        train(TrainConfig(resume=str(run), method="rlrr", method_options={"init": "zeros"}, hflip=False))
    assert all(f"{name}:" in err.value.message for name in ("method", "hflip"))
    with pytest.raises(UsageError, match=r"method_options.r: 4 differs from the resumed run's 2"):
        train(TrainConfig(resume=str(run), method_options={"r": 4}))
    # the run's own values (spelled as the user would) are accepted; the run is complete, so nothing else happens
    same = dict(
        seed=7,
        data=str(digit_folder),
        method="lora",
        method_options={"r": 2},
        lr=5e-3,
        epochs=3,
        device="cpu",
        amp="off",
    )
    with pytest.raises(UsageError, match="already complete") as err:
        train(TrainConfig(resume=str(run), **same))
    assert f"--resume {run} --epochs N (N > 3)" in err.value.hint
    assert (run / "summary.json").read_bytes() == summary  # not rewritten


def test_resume_through_the_cli_passes_only_the_options_given(uninterrupted) -> None:
    from peftx.cli.app import app

    run, _ = uninterrupted
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--seed", "42", "--json"])
    assert res.exit_code == 2 and "seed: 42 differs from the resumed run's 7" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--json"])  # nothing given: nothing differs
    assert res.exit_code == 2 and "is already complete" in res.stderr and "differs" not in res.stderr


def _copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy"))


def test_extending_a_finished_run_trains_to_the_new_total(uninterrupted, tmp_path) -> None:
    from peftx.train.schedule import Schedule

    run = _copy_run(uninterrupted[0], tmp_path)
    events: list[tuple[str, dict]] = []
    with pytest.raises(UsageError, match="fewer than the resumed run's 3"):
        train(TrainConfig(resume=str(run), epochs=2))
    summary = train(TrainConfig(resume=str(run), epochs=5), progress=lambda e: events.append((e.name, e.fields())))
    assert summary["epochs"] == 5 and [r["epoch"] for r in _history(run)] == [1, 2, 3, 4, 5]
    assert summary["extensions"] == [
        {"from_epochs": 3, "to_epochs": 5, "at_epoch": 3, "at_global_step": 3 * STEPS_PER_EPOCH}
    ]
    (start,) = [f for e, f in events if e == "start"]
    assert start["extended_from"] == 3 and any("extends the run" in n for n in start["notes"])
    # the schedule is the one of a 5-epoch run from the resume step on
    new = Schedule(
        lr=5e-3,
        steps_per_epoch=STEPS_PER_EPOCH,
        epochs=5,
        warmup_epochs=1,
        cooldown_epochs=0,
        warmup_lr=1e-7,
        min_lr=1e-5,
    )
    lrs = {f["global_step"]: f["lr"] for e, f in events if e == "step"}
    assert min(lrs) == 3 * STEPS_PER_EPOCH + 1
    assert all(lr == pytest.approx(new(step - 1)) for step, lr in lrs.items())
    assert load_checkpoint(run).config["epochs"] == 5 and load_checkpoint(run).state.extensions
    assert json.loads((run / "summary.json").read_text())["epochs"] == 5


def test_resume_of_a_run_finished_but_without_summary_writes_it_without_training(uninterrupted, tmp_path) -> None:
    full_run, full_summary = uninterrupted
    run = _copy_run(full_run, tmp_path)
    (run / "summary.json").unlink()  # killed during the final test evaluation
    events: list[str] = []
    summary = train(TrainConfig(resume=str(run)), progress=lambda e: events.append(e.name))
    assert "step" not in events and "epoch" not in events
    assert summary["test_accuracy"] == full_summary["test_accuracy"] and (run / "summary.json").is_file()


def _rewrite_checkpoint(run: Path, edit) -> None:
    path = checkpoint_path(run)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["peftx_checkpoint"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    save_file(tensors, str(path), metadata={"peftx_checkpoint": json.dumps(meta)})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["state"].update(epoch="three"), "state.epoch is 'three', not an integer"),
        (lambda m: m["state"].update(global_step=-4), "state.global_step is -4"),
        (lambda m: m["state"].update(history={"epoch": 1}), "state.history"),
        (lambda m: m.update(state=[1, 2]), "state is [1, 2], not a mapping"),
        (lambda m: m["config"].update(lr="fast"), "config is damaged (lr: 'fast' must be a positive"),
        (lambda m: m["config"].pop("epochs"), "config lacks epochs"),
        (lambda m: m["optimizer"].update(param_groups="x"), "optimizer.param_groups"),
    ],
    ids=[
        "epoch-not-int",
        "negative-step",
        "history-not-list",
        "state-not-mapping",
        "config-bad-lr",
        "config-no-epochs",
        "optimizer-groups",
    ],
)
def test_damaged_checkpoint_fields_are_a_typed_error(uninterrupted, tmp_path, edit, message) -> None:
    run = _copy_run(uninterrupted[0], tmp_path)
    _rewrite_checkpoint(run, edit)
    with pytest.raises(AdapterFileError) as err:
        train(TrainConfig(resume=str(run), epochs=4))
    assert message in err.value.message and "damaged" in err.value.hint


def test_damaged_checkpoint_through_the_cli_is_one_line_exit_3(uninterrupted, tmp_path) -> None:
    from peftx.cli.app import app

    run = _copy_run(uninterrupted[0], tmp_path)
    _rewrite_checkpoint(run, lambda m: m["state"].update(epoch=1.5))
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "4", "--json"])
    assert res.exit_code == 3 and res.stderr.count("\n") == 1 and "state.epoch is 1.5" in res.stderr


def _is_safetensors(path: Path) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then that many bytes of JSON."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    if not 2 <= size <= len(data) - 8:
        return False
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        return False
    return isinstance(header, dict) and "__metadata__" in header


def test_checkpoint_is_safetensors_and_pickles_are_refused(uninterrupted, tmp_path) -> None:
    run, _ = uninterrupted
    path = checkpoint_path(run)
    assert _is_safetensors(path) and not is_pickle_file(path)
    ckpt = load_checkpoint(run)
    assert ckpt.state.epoch == 3 and ckpt.config["method"] == "lora"
    assert {"exp_avg", "exp_avg_sq", "step"} <= {k for v in ckpt.optimizer["tensors"].values() for k in v}
    bad = tmp_path / "bad" / "checkpoint" / "last.safetensors"
    bad.parent.mkdir(parents=True)
    torch.save({"param/x": torch.zeros(1)}, bad)
    assert not _is_safetensors(bad) and is_pickle_file(bad)  # the check above can fail: a torch file fails it
    with pytest.raises(AdapterFileError, match="pickle"):
        load_checkpoint(bad.parent.parent)
    with pytest.raises(AdapterFileError, match="no training checkpoint"):
        train(TrainConfig(resume=str(tmp_path / "missing")))
