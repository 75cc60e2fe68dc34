"""`peftx bench`: inference, training and export benchmarks side by side, against a matmul peak measured in the run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import handle_errors
from ..options import Device, Json
from ..output import console, err_console, print_json, table

DEFAULT_OUTPUT = Path("bench-results")


@handle_errors
def bench(
    suite: Annotated[
        str, typer.Option("--suite", help="Comma-separated: inference, training, export, profile.")
    ] = "inference,training,export",
    models: Annotated[
        str | None,
        typer.Option(
            "--models",
            help="Inference models: vit_s14 (real DINOv2 demo weights), vit_b16, swin_t, tiny (smoke runs).",
            show_default="vit_s14,vit_b16,swin_t; --quick: vit_s14",
        ),
    ] = None,
    batch: Annotated[
        str | None,
        typer.Option("--batch", help="Inference batch sizes, comma-separated.", show_default="1,32; --quick: 1,8"),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Adapters timed unmerged at inference (the first is also merged).",
            show_default="rlrr,aoft,lora; --quick: rlrr,lora",
        ),
    ] = None,
    train_models: Annotated[
        str | None, typer.Option("--train-models", help="Training backbones.", show_default="vit_s14")
    ] = None,
    train_batch: Annotated[int, typer.Option("--train-batch", min=1, help="Training batch size.")] = 32,
    train_img_size: Annotated[
        int | None,
        typer.Option(
            "--train-img-size",
            min=1,
            help="Training image size.",
            show_default="the model's training size, 112 px for the ViTs",
        ),
    ] = None,
    train_amp: Annotated[
        str,
        typer.Option(
            "--train-amp", help="Training precision: off, bf16, or fp16 (with a GradScaler), as peftx train --amp."
        ),
    ] = "off",
    train_methods: Annotated[
        str | None,
        typer.Option(
            "--train-methods",
            help="Training methods, comma-separated: frozen (the backbone-only reference) and any "
            "registered method, full and linear included.",
            show_default="full,frozen,lora,rlrr,aoft",
        ),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="Precision of the PyTorch inference variants (weights and inputs): fp32, bf16 or fp16; "
            "the matmul peak is measured in it.",
        ),
    ] = "fp32",
    compile_backend: Annotated[
        str,
        typer.Option(
            "--compile",
            help="Also time torch.compile'd plain, merged and unmerged models with this backend (inductor; "
            "eager = tracing only), or off.",
        ),
    ] = "off",
    onnxruntime: Annotated[
        bool, typer.Option("--onnxruntime/--no-onnxruntime", help="Time ONNX Runtime (FP32) beside PyTorch.")
    ] = True,
    matmul_n: Annotated[
        int | None,
        typer.Option(
            "--matmul-n",
            min=16,
            help="Size of the n^3 GEMM whose speed is the peak (a GPU needs about 8192 to reach its peak).",
            show_default="2048",
        ),
    ] = None,
    export_models: Annotated[
        str | None,
        typer.Option(
            "--export-models", help="Export-suite backbones.", show_default="vit_s14,vit_b16; --quick: vit_s14"
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="A couple of minutes on 2 cores: ViT-S only, few repetitions; its verdicts are marked indicative.",
        ),
    ] = False,
    budget: Annotated[
        float | None,
        typer.Option(
            "--budget",
            min=0.1,
            help="Seconds of timing per (model, batch) before rounds stop (at least --min-rounds).",
            show_default="20; --quick: 4",
        ),
    ] = None,
    min_rounds: Annotated[
        int | None,
        typer.Option(
            "--min-rounds", min=1, help="Fewest measured rounds per (model, batch).", show_default="5; --quick: 2"
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=1, help="torch and ONNX Runtime intra-op threads.", show_default="the physical cores"
        ),
    ] = None,
    device: Device = "auto",
    tensorrt: Annotated[
        str, typer.Option("--tensorrt", help="auto: time TensorRT engines where TensorRT and a GPU exist; off.")
    ] = "auto",
    time_bundle: Annotated[
        bool,
        typer.Option(
            "--time-bundle", help="Export suite: also time the whole bundle writer (export, FP16, every parity check)."
        ),
    ] = False,
    bundle: Annotated[bool, typer.Option("--bundle", hidden=True, help="Alias of --time-bundle.")] = False,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory for bench.json and bench.png.")
    ] = DEFAULT_OUTPUT,
    keep_onnx: Annotated[
        bool, typer.Option("--keep-onnx", help="Keep the ONNX files (in OUTPUT/onnx) instead of a temporary directory.")
    ] = False,
    json_out: Json = False,
) -> None:
    """Benchmark inference (eager / ONNX Runtime / TensorRT), training step cost and export time; write JSON + PNG."""
    from peftx.bench import BenchConfig, parse_list, result_tables, run_benchmarks, write_results

    overrides: dict[str, Any] = {
        "suites": parse_list(suite),
        "batches": parse_list(batch, kind=int),
        "train_batch": train_batch,
        "device": device,
        "tensorrt": tensorrt,
        "threads": threads,
        "export_bundle": time_bundle or bundle,
        "models": parse_list(models),
        "methods": parse_list(methods),
        "train_models": parse_list(train_models),
        "export_models": parse_list(export_models),
        "budget_s": budget,
        "min_rounds": min_rounds,
        "train_img_size": train_img_size,
        "train_amp": train_amp,
        "train_methods": parse_list(train_methods),
        "dtype": dtype,
        "compile": compile_backend,
        "onnxruntime": onnxruntime,
        "matmul_n": matmul_n,
        "work_dir": str(output / "onnx") if keep_onnx else None,
    }
    overrides = {k: v for k, v in overrides.items() if v not in (None, ())}
    cfg = BenchConfig.quick(**overrides) if quick else BenchConfig(**overrides)
    say = (lambda _m: None) if json_out else (lambda m: err_console.print(f"[dim]· {m}[/]"))
    results = run_benchmarks(cfg, progress=say)
    paths = write_results(results, output)
    if json_out:
        print_json(results)
        return
    for title, columns, rows in result_tables(results):
        console.print(table(title, columns, rows))
    console.print(f"results: {', '.join(str(p) for p in paths.values())} ({results['wall_s']:.0f} s)")
