"""`peftx export` (a plain fine-tuned timm checkpoint) and `peftx convert` (a peftx run as a peft adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import handle_errors
from ..options import Force, Images, ImgSize, Json, Weights, with_bundle_options
from ..output import console, key_values, print_json
from ..render import Renderer
from .export_cmd import show_bundle


@handle_errors
@with_bundle_options
def export(
    model: Annotated[str, typer.Argument(help="timm model name of the checkpoint, e.g. vit_base_patch16_224.")],
    weights: Weights = None,
    num_classes: Annotated[
        int | None, typer.Option("--num-classes", help="Classes of the head.", show_default="read from the checkpoint")
    ] = None,
    class_names: Annotated[
        Path | None,
        typer.Option(
            "--class-names",
            help="Text file, one class name per line, in the head's order.",
            show_default="0, 1, 2, ...",
        ),
    ] = None,
    img_size: ImgSize = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Bundle directory.", show_default="WEIGHTS-bundle beside the checkpoint"),
    ] = None,
    *,
    bundle: dict[str, Any],  # the bundle options (cli.options.BUNDLE_OPTIONS), as the library takes them
    json_out: Json = False,
) -> None:
    """Export a plain fine-tuned timm checkpoint (no adapter) to the same validated bundle as merge-export, with the
    same options (INT8 needs --calibration-data: a checkpoint records no training data)."""
    from peftx.plain_export import export_checkpoint

    report = export_checkpoint(
        model,
        weights=weights,
        num_classes=num_classes,
        class_names_file=class_names,
        img_size=img_size,
        output=output,
        progress=None if json_out else Renderer(),
        **bundle,
    )
    show_bundle(report, json_out)


@handle_errors
def convert(
    run: Annotated[
        Path, typer.Argument(help="Run directory (from `peftx train`, method lora or aoft) or its adapter file.")
    ],
    to: Annotated[
        str, typer.Option("--to", help="Format to write: peft (a Hugging Face peft LoRA directory).")
    ] = "peft",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Directory to write.", show_default="RUN/peft")
    ] = None,
    weights: Weights = None,
    images: Images = None,
    force: Force = False,
    json_out: Json = False,
) -> None:
    """Write a peftx adapter in another format (peft: loads with PeftModel.from_pretrained onto the same timm model),
    checked against the peftx model."""
    from peftx.peft_convert import convert_run

    report = convert_run(
        run,
        to=to,
        output=output,
        weights=weights,
        images_dir=images,
        force=force,
        progress=None if json_out else Renderer(),
    )
    if json_out:
        print_json(report.to_json())
        return
    from peftx.exports.parity import parity_table

    console.print(parity_table([report.parity], title="peft's load of the adapter vs the peftx model"))
    console.print(
        key_values(
            "peft adapter",
            {
                "directory": report.out_dir,
                "layers": report.layers,
                "ranks": ", ".join(sorted({str(r) for r in report.ranks.values()})),
            },
        )
    )
