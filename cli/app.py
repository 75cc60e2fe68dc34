"""The Typer app: registers one plain function per command. Logic lives in the library, never here."""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.22 vendors click; its exception classes live here (there is no public alias)
    from typer._click import exceptions as click_errors
except ImportError:  # older typer on top of click
    from click import exceptions as click_errors

from .commands import (bench_cmd, byo_cmd, compare_cmd, demo_cmd, export_cmd, gpucheck_cmd, inspect_cmd, targets_cmd,
                       train_cmd)

app = typer.Typer(
    name="peftx",
    help="Fine-tune timm ViT/Swin with RLRR, AOFT or LoRA; merge into plain weights; export validated ONNX/TensorRT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)



@app.callback()
def _root() -> None:
    """peftx: parameter-efficient fine-tuning for timm vision transformers, deployed to the edge."""


app.command("demo")(demo_cmd.demo)
app.command("train")(train_cmd.train)
app.command("eval")(train_cmd.eval)
app.command("inspect")(inspect_cmd.inspect)
app.command("merge-export")(export_cmd.merge_export)
app.command("validate")(export_cmd.validate)
app.command("export")(byo_cmd.export)
app.command("convert")(byo_cmd.convert)
app.command("bench")(bench_cmd.bench)
app.command("targets")(targets_cmd.targets)
app.command("doctor")(targets_cmd.doctor)
app.command("env", help="Alias of `peftx doctor`.")(targets_cmd.doctor)
app.command("compare")(compare_cmd.compare)
app.command("gpu-check")(gpucheck_cmd.gpu_check)


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
