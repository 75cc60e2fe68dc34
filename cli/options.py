"""Option aliases shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from peftx.methods.registry import method_names

# readable=False: peftx checks readability itself (a one-line WeightsError) instead of Click's multi-line usage error.
Weights = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        "-w",
        help="Local backbone weights (.safetensors, or a torch file of tensors, loaded with weights_only).",
        show_default="the model's own: embedded for the default backbone, else the hub's",
        readable=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output (never done without it).")]
# The one spelling for "replace an existing output" is --force; --overwrite (train's old name) stays as a hidden alias.
Overwrite = Annotated[bool, typer.Option("--overwrite", hidden=True, help="Alias of --force.")]
Method = Annotated[str, typer.Option("--method", "-m", help=f"Adapter method: {', '.join(method_names())}.")]
# train: None = rlrr for a new run, the run's own with --resume
RunMethod = Annotated[
    str | None,
    typer.Option(
        "--method",
        "-m",
        help=f"Adapter method: {', '.join(method_names())}.",
        show_default="rlrr; with --resume, the run's",
    ),
]
# The options several methods share; each method's module maps them to its config fields (an option the chosen
# method lacks is a one-line usage error naming the options it has). Anything else: --method-option KEY=VALUE.
Rank = Annotated[
    int | None,
    typer.Option(
        "--rank", "-r", help="Rank, for methods that have one (lora r, aoft d).", show_default="the method's: 8"
    ),
]
Alpha = Annotated[
    float | None, typer.Option("--alpha", help="LoRA alpha (the update is scaled by alpha / rank).", show_default="8")
]
Targets = Annotated[
    str | None,
    typer.Option(
        "--targets",
        help="Comma list of q,k,v,qkv,proj,fc1,fc2,reduction.",
        show_default="the method's: rlrr qkv,proj,fc1,fc2,reduction; lora, aoft q,v",
    ),
]
Init = Annotated[str | None, typer.Option("--init", help="RLRR init: kaiming, normal, zeros.", show_default="kaiming")]
MethodOption = Annotated[
    list[str] | None,
    typer.Option(
        "--method-option",
        metavar="KEY=VALUE",
        help="KEY=VALUE, repeatable: any field of the method's config, e.g. --method-option ssf=false.",
        show_default="none",
    ),
]
Device = Annotated[
    str, typer.Option("--device", help="auto (a GPU when there is one), cpu or cuda.", show_default="auto")
]
Target = Annotated[
    str | None,
    typer.Option(
        "--target",
        "-t",
        help="Deployment target: trt8.5, trt8.6, trt10, trt11, jetpack5, jetpack6.0, jetpack6, "
        "jetpack7 or auto (the installed TensorRT's); see `peftx targets`.",
        show_default="trt8.6",
    ),
]

# The bundle options every exporting command shares (`merge-export` declares its own copies of the first four).
Batch = Annotated[str, typer.Option("--batch", help="Dynamic batch profile MIN:OPT:MAX.")]
Precision = Annotated[
    str, typer.Option("--precision", help="fp32 or fp16 (the TensorRT engine; the FP16 ONNX is always checked).")
]
TensorRT = Annotated[
    str,
    typer.Option(
        "--tensorrt",
        help="auto: build an engine when TensorRT and a GPU exist; on: require it; off: skip (and "
        "tolerate readiness problems).",
    ),
]
Images = Annotated[
    Path | None,
    typer.Option(
        "--images",
        help="Directory of real images for the parity check.",
        show_default="the run's validation images, else shipped photos",
    ),
]
NoSimplify = Annotated[bool, typer.Option("--no-simplify", help="Skip the onnxslim pass.")]
ImgSize = Annotated[
    int | None,
    typer.Option("--img-size", min=1, help="Image size the model was fine-tuned at.", show_default="the timm model's"),
]
