"""The Typer app: registers one plain function per command. Logic lives in the library, never here."""

from __future__ import annotations

import typer

from .commands import bench_cmd, demo_cmd, export_cmd, inspect_cmd, train_cmd

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
app.command("bench")(bench_cmd.bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
