"""The two baselines as registered methods, end to end on a real tiny ViT weights file and real digit PNGs:
``linear`` (a new head on the frozen backbone) and ``full`` (every weight trains; merging is the identity).

Each trains, saves (full: the whole model in the adapter file, with the usual checks), loads back for evaluation,
merge-exports and validates; ``full`` resumes from an interrupted run to the bit-identical result."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftx.adapter_io import ADAPTER_FILE, read_adapter
from peftx.deploy import load_reference, merge_export, validate
from peftx.errors import AdapterFileError, AdapterMismatchError, NonFiniteError
from peftx.evaluate import evaluate
from peftx.events import Step
from peftx.train import TrainConfig, TrainingInterrupted, train
from peftx.train.checkpoint import checkpoint_path, load_checkpoint

RUN = dict(epochs=2, batch_size=8, lr=2e-3, warmup_epochs=0, dropout=0.0, hflip=False)


@pytest.fixture(scope="module", params=["linear", "full"])
def trained(request, tiny_weights, digit_folder, tmp_path_factory):
    run = tmp_path_factory.mktemp(request.param) / "run"
    summary = train(tiny_config(tiny_weights, run, data=str(digit_folder), method=request.param, **RUN))
    return request.param, run, summary


def test_baseline_trains_what_it_should(trained, tiny_weights):
    method, run, summary = trained
    config, tensors = read_adapter(run / ADAPTER_FILE)
    start = load_file(str(tiny_weights))  # the backbone the run started from (headless)
    if method == "linear":
        assert set(tensors) == {"head.weight", "head.bias"} and summary["trainable_params"] == 4 * 64 + 4
    else:  # the whole model: every parameter of the backbone (changed by training) plus the new head
        assert set(tensors) == set(start) | {"head.weight", "head.bias"}
        assert summary["trainable_params"] == summary["total_params"] == sum(t.numel() for t in tensors.values())
        changed = [k for k in start if not torch.equal(tensors[k], start[k])]
        assert len(changed) > 0.9 * len(start), f"only {len(changed)} of {len(start)} backbone tensors trained"
    assert tensors["head.weight"].abs().sum() > 0  # the zero-initialised head learned
    assert config["method"] == method and config["num_classes"] == 4


@pytest.mark.slow
def test_baseline_loads_back_evaluates_and_exports(trained):
    method, run, summary = trained
    result = evaluate(run, split="test", device="cpu")
    assert result["accuracy"] == summary["test_accuracy"] and result["n"] == summary["test_images"]
    loaded = load_reference(run)
    assert loaded.config["method"] == method
    report = merge_export(run, batch=(1, 2, 4), simplify=False, tensorrt="off")
    assert report.status == "ok"
    assert validate(run / "bundle", tensorrt="off").passed
    meta = json.loads((run / "bundle" / "metadata.json").read_text())
    assert meta["provenance"]["method"] == method


@pytest.mark.parametrize("trained", ["full"], indirect=True)
def test_full_adapter_file_has_the_usual_checks(trained, tiny_weights, tmp_path):
    """The whole-model file is refused on other base weights, with a wrong shape or a NaN, like any adapter."""
    _, run, _ = trained
    from peftx.adapter_io import load_adapter
    from peftx.sources import rebuild_model

    config, tensors = read_adapter(run / ADAPTER_FILE)
    other = tmp_path / "other.safetensors"  # the same architecture, other weights: another fingerprint
    save_file({k: (v + 0.01).contiguous() for k, v in load_file(str(tiny_weights)).items()}, str(other))
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        load_adapter(rebuild_model(config, weights=other), run)
    for name, mutate, err in (
        ("shape", lambda t: t.__setitem__("blocks.0.attn.qkv.weight", torch.zeros(3, 3)), AdapterFileError),
        ("nan", lambda t: t["blocks.1.mlp.fc1.weight"].__setitem__((0, 0), float("nan")), NonFiniteError),
    ):
        bad = {k: v.clone() for k, v in tensors.items()}
        mutate(bad)
        path = tmp_path / name / ADAPTER_FILE
        path.parent.mkdir()
        save_file(bad, str(path), metadata={"peftx_config": json.dumps(config)})
        with pytest.raises(err):
            load_adapter(rebuild_model(config), path)


@pytest.mark.slow
def test_full_fine_tuning_resumes_bit_identical(tiny_weights, digit_folder, tmp_path):
    """SIGINT mid-epoch, then --resume: the checkpoint holds every parameter and its AdamW moments, and the resumed
    run ends with exactly the weights of the uninterrupted one."""
    cfg = dict(RUN, method="full", epochs=2, dropout=0.1)
    whole = tmp_path / "whole"
    train(tiny_config(tiny_weights, whole, data=str(digit_folder), **cfg))
    run = tmp_path / "run"

    def interrupt(event):
        if isinstance(event, Step) and event.epoch == 2 and event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(tiny_config(tiny_weights, run, data=str(digit_folder), **cfg), progress=interrupt)
    ckpt = load_checkpoint(run)
    names = set(load_file(str(tiny_weights))) | {"head.weight", "head.bias"}
    assert set(ckpt.params) == names and (ckpt.state.epoch, ckpt.state.batch) == (1, 2)
    with safe_open(str(checkpoint_path(run)), framework="pt") as f:
        keys = set(f.keys())
    assert all(f"optim/{n}/exp_avg" in keys and f"optim/{n}/exp_avg_sq" in keys for n in names)
    train(TrainConfig(resume=str(run)))
    done, resumed = load_checkpoint(whole).params, load_checkpoint(run).params
    assert done.keys() == resumed.keys()
    for name in done:
        assert torch.equal(done[name], resumed[name]), name


def test_full_fine_tuning_scales_the_adapter_recipes_learning_rate():
    """The recipes are tuned for adapters; full fine-tuning takes a hundredth of their lr unless --lr is given."""
    from peftx.train.recipes import DEMO, VTAB_1K

    assert TrainConfig(method="full").resolved().lr == pytest.approx(DEMO.lr / 100)
    assert TrainConfig(method="full", task="dtd", data="x").resolved().lr == pytest.approx(VTAB_1K["dtd"].lr / 100)
    assert TrainConfig(method="full", lr=1e-3).resolved().lr == 1e-3  # an explicit lr wins
    resolved = TrainConfig(method="full").resolved()
    assert resolved.resolved().lr == resolved.lr  # resolving again (a resumed run's config) does not scale twice
    for method in ("rlrr", "linear"):
        assert TrainConfig(method=method).resolved().lr == DEMO.lr
