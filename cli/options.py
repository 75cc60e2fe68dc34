"""Option aliases shared by several commands, defined once."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from peftx.exports.targets import AUTO, DEFAULT_TARGET, target_names
from peftx.methods.registry import method_names
from peftx.train.recipes import DEMO, GENERIC, VTAB_1K

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


def _number(value: float) -> str:
    """3e-3, 0.5, 224: a recipe's value as its table writes it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value and abs(value) < 1e-2:
        return f"{value:.0e}".replace("e-0", "e-")
    return f"{value:g}"


def recipe_default(field: str) -> str:
    """A training option's default as the recipes (peftx.train.recipes) hold it: the demo's, your own data's (the
    generic recipe) and VTAB-1k's (one value, or "per task"), written once where they agree."""
    demo, own = getattr(DEMO, field), getattr(GENERIC, field)
    vtab = {getattr(r, field) for r in VTAB_1K.values()}
    shown_vtab = _number(next(iter(vtab))) if len(vtab) == 1 else "per task"
    if demo == own and vtab == {own}:
        return f"the recipe's: {_number(own)}"
    shown = _number(own) if demo == own else f"demo {_number(demo)}, own data {_number(own)}"
    return f"the recipe's: {shown}, VTAB {shown_vtab}"


# The training options `train` and `compare` share (None: the recipe's / the trainer's default).
Task = Annotated[
    str | None,
    typer.Option(
        "--task",
        help="VTAB-1k task name: the paper's per-task recipe (lr, weight decay, dropout, flip).",
        show_default="none: the demo's or the generic recipe",
    ),
]
Amp = Annotated[str | None, typer.Option("--amp", help="auto, bf16, fp16 or off.", show_default="auto")]
Device = Annotated[
    str, typer.Option("--device", help="auto (a GPU when there is one), cpu or cuda.", show_default="auto")
]
Target = Annotated[
    str | None,
    typer.Option(
        "--target",
        "-t",
        help=f"Deployment target: {', '.join(target_names()[:-1])} or {AUTO} (the installed TensorRT's); see "
        "`peftx targets`.",
        show_default=DEFAULT_TARGET,
    ),
]

# The bundle options, declared once: every way into a bundle (`merge-export` a run or a peft adapter, `export` a plain
# checkpoint) takes all of them through `with_bundle_options`, and `bundle_kwargs` turns them into the library's
# arguments the one same way.
Batch = Annotated[str, typer.Option("--batch", help="Dynamic batch profile MIN:OPT:MAX.")]
Precision = Annotated[
    str,
    typer.Option(
        "--precision",
        help=(
            "fp32, fp16 or int8 (the TensorRT engine; the FP16 ONNX is always checked; int8 also writes "
            "model_int8.onnx, calibrated and accuracy-gated)."
        ),
    ),
]
Calibration = Annotated[
    int | None,
    typer.Option(
        "--calibration",
        help="INT8: training images to calibrate on (seeded, class-stratified).",
        show_default="256",
    ),
]
CalibrationMethod = Annotated[str, typer.Option("--calibration-method", help="INT8: minmax, entropy or percentile.")]
CalibrationData = Annotated[
    Path | None,
    typer.Option(
        "--calibration-data",
        help=(
            "INT8: training images to calibrate on when the run's data moved (DIR/<class>/... or an ImageFolder root)."
        ),
        show_default="the run's training split",
    ),
]
TensorRT = Annotated[
    str,
    typer.Option(
        "--tensorrt",
        help="auto: build an engine when TensorRT and a GPU exist; on: require it; off: skip (and "
        "tolerate readiness problems).",
    ),
]
BundleImages = Annotated[
    Path | None,
    typer.Option(
        "--images",
        help=(
            "Real images for the parity check; labelled as DIR/<class>/... (or DIR/test/<class>/...), they are "
            "also the accuracy check's."
        ),
        show_default="the run's validation images; accuracy on its test split",
    ),
]
AccuracyImages = Annotated[
    str,
    typer.Option(
        "--accuracy-images",
        help="Labelled images the accuracy check measures (a seeded subset of a larger split), 'all', or 0 to skip.",
    ),
]
# `peftx convert`: images for its parity check only.
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


# name -> (option, default), in the order --help lists them.
BUNDLE_OPTIONS: dict[str, tuple[Any, Any]] = {
    "batch": (Batch, "1:8:32"),
    "precision": (Precision, "fp32"),
    "calibration": (Calibration, None),
    "calibration_method": (CalibrationMethod, "minmax"),
    "calibration_data": (CalibrationData, None),
    "tensorrt": (TensorRT, "auto"),
    "images": (BundleImages, None),
    "accuracy_images": (AccuracyImages, "500"),
    "no_simplify": (NoSimplify, False),
    "target": (Target, None),
    "force": (Force, False),
}


def bundle_kwargs(
    *,
    batch: str,
    precision: str,
    calibration: int | None,
    calibration_method: str,
    calibration_data: Path | None,
    tensorrt: str,
    images: Path | None,
    accuracy_images: str,
    no_simplify: bool,
    target: str | None,
    force: bool,
) -> dict[str, Any]:
    """The bundle options as :func:`peftx.deploy.merge_export` takes them (``export`` passes them on unchanged)."""
    from peftx.deploy import parse_batch, parse_count

    return dict(
        batch=parse_batch(batch),
        precision=precision,
        calibration=calibration,
        calibration_method=calibration_method,
        calibration_data=calibration_data,
        tensorrt=tensorrt,
        images_dir=images,
        accuracy_limit=parse_count(accuracy_images),
        simplify=not no_simplify,
        target=target,
        force=force,
    )


def with_bundle_options(fn: Callable[..., None]) -> Callable[..., None]:
    """A command that writes a bundle: its parameter ``bundle`` becomes every option of :data:`BUNDLE_OPTIONS` (in
    its place in --help), and the command receives them as one dict, :func:`bundle_kwargs`' library arguments."""
    signature = inspect.signature(fn, eval_str=True)
    params = list(signature.parameters.values())
    at = [p.name for p in params].index("bundle")
    options = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=option, default=default)
        for name, (option, default) in BUNDLE_OPTIONS.items()
    ]
    params[at : at + 1] = options

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> None:
        chosen = {name: kwargs.pop(name) for name in BUNDLE_OPTIONS}
        fn(*args, bundle=bundle_kwargs(**chosen), **kwargs)

    # typer reads the options from the signature; every parameter keyword-only as typer passes them
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    )
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
