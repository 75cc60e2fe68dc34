"""The Typer app: registers one plain function per command. Logic lives in the library, never here."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

try:  # typer >= 0.22 vendors click; its exception classes live here (there is no public alias)
    from typer._click import exceptions as click_errors
except ImportError:  # older typer on top of click
    from click import exceptions as click_errors  # type: ignore[no-redef]  # same module, the older home

from .commands import (
    bench_cmd,
    byo_cmd,
    compare_cmd,
    demo_cmd,
    export_cmd,
    gpucheck_cmd,
    inspect_cmd,
    report_cmd,
    targets_cmd,
    train_cmd,
)

app = typer.Typer(
    name="peftx",
    help="Fine-tune timm ViT/Swin with RLRR, AOFT or LoRA; merge into plain weights; export validated ONNX/TensorRT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Click's plain help: it wraps long option texts and defaults at the terminal width (rich's panels cut them off
    # with "…" at 80 columns, and read "[default: ...]" inside help strings as markup).
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from peftx import __version__

        print(f"peftx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """peftx: parameter-efficient fine-tuning for timm vision transformers, deployed to the edge."""


# short_help: the command list shows each in full (click cuts a longer docstring's first sentence with "...").
app.command("demo", short_help="Train, merge, export and validate the embedded demo.")(demo_cmd.demo)
app.command("train", short_help="Fine-tune an adapter (no options: the demo).")(train_cmd.train)
app.command("eval", short_help="Accuracy, per class and confusion, of a trained run.")(train_cmd.eval)
app.command("inspect", short_help="Which layers a method adapts; parameter counts.")(inspect_cmd.inspect)
app.command("merge-export", short_help="Merge, export ONNX (+ TensorRT), check parity.")(export_cmd.merge_export)
app.command("validate", short_help="Re-check a bundle against the unmerged model.")(export_cmd.validate)
app.command("report", short_help="A device's device_report.json beside the host's validation.")(report_cmd.report)
app.command("export", short_help="Export a plain fine-tuned timm checkpoint (no adapter).")(byo_cmd.export)
app.command("convert", short_help="Convert a LoRA run to a Hugging Face peft adapter.")(byo_cmd.convert)
app.command("bench", short_help="Benchmark inference, training and export.")(bench_cmd.bench)
app.command("compare", short_help="Train several methods on the same data; one table.")(compare_cmd.compare)
app.command("targets", short_help="The deployment targets (TensorRT releases).")(targets_cmd.targets)
app.command("doctor", short_help="What this machine has for deployment.")(targets_cmd.doctor)
app.command("env", help="Alias of `peftx doctor`.", short_help="Alias of `peftx doctor`.")(targets_cmd.doctor)
app.command("gpu-check", short_help="The GPU check: AMP training, CUDA parity, GPU bench.")(gpucheck_cmd.gpu_check)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Click's own parse errors (unknown option, bad value) become the same one-line form
    as library errors instead of a boxed usage panel; exit 2 as click gives them."""
    try:
        code = app(args=argv, prog_name="peftx", standalone_mode=False)
    except click_errors.NoArgsIsHelpError:  # typer has printed the help already
        code = 2
    except click_errors.UsageError as e:
        where = e.ctx.command_path if e.ctx else "peftx"
        print(f"peftx: error: {e.format_message()} — see '{where} --help'".replace("\n", " "), file=sys.stderr)
        code = e.exit_code
    except click_errors.ClickException as e:
        print(f"peftx: error: {e.format_message()}".replace("\n", " "), file=sys.stderr)
        code = e.exit_code
    except getattr(click_errors, "Abort", typer.Abort):  # typer >= 0.22 vendors click without Abort
        print("peftx: error: aborted", file=sys.stderr)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
