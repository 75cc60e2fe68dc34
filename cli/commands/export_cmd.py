"""`peftx merge-export` and `peftx validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import handle_errors
from ..options import ImgSize, Json, Overwrite, Weights, with_bundle_options
from ..output import console, key_values, print_json
from ..render import Renderer


@handle_errors
@with_bundle_options
def merge_export(
    source: Annotated[
        Path,
        typer.Argument(
            help="Run directory (from `peftx train`), an adapter .safetensors file, or a peft adapter directory."
        ),
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Bundle directory.", show_default="SOURCE/bundle")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help=(
                "Backbone name: the timm model of a peft adapter, or of an adapter file that records none (peftx runs "
                "record theirs)."
            ),
            show_default="the one the adapter records",
        ),
    ] = None,
    weights: Weights = None,
    img_size: ImgSize = None,
    *,
    bundle: dict[str, Any],  # the bundle options (cli.options.BUNDLE_OPTIONS), as the library takes them
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Merge an adapter into its backbone, export ONNX (+ TensorRT), and validate every artifact against the unmerged
    model.
    """
    from peftx.deploy import merge_export as run

    report = run(
        source,
        output=output,
        model_name=model,
        weights=weights,
        img_size=img_size,
        progress=None if json_out else Renderer(),
        **{**bundle, "force": bundle["force"] or overwrite},
    )
    show_bundle(report, json_out)


def show_bundle(report, json_out: bool) -> None:
    """A written bundle, for people (parity, accuracy, what was written) or as JSON: every exporting command's."""
    if json_out:
        print_json(report.to_json())
        return
    console.print(report.parity.table())
    if report.parity.accuracy is not None:
        console.print(report.parity.accuracy.table())
    console.print(key_values("bundle", bundle_items(report)))


def bundle_items(report) -> dict[str, str]:
    """What merge-export wrote, for people: directory, status, target readiness, files, TensorRT, step times."""
    files = sorted(p.name for p in report.out_dir.iterdir())
    target_line = f"{report.target.requested or report.target.name} (TensorRT >= {report.target.tensorrt_min}): " + (
        "TensorRT-ready" if report.readiness.ok else "NOT TensorRT-ready, see trt_readiness.json"
    )
    items = {
        "directory": str(report.out_dir),
        "status": report.status,
        "target": target_line,
        "files": ", ".join(files),
        "tensorrt": report.tensorrt.get("message", ""),
    }
    if report.int8:
        items["int8"] = int8_line(report.int8)
    return {**items, "seconds": ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items())}


def int8_line(info: dict) -> str:
    """model_int8.onnx in one line: what is quantized, the calibration, and what the fallback kept float."""
    fallback = info.get("fallback") or {}
    floats = info.get("float_nodes") or []
    kept = (
        f"{len(floats)} kept float ({', '.join(floats[:3])}{' ...' if len(floats) > 3 else ''})"
        if floats
        else "none kept float"
    )
    verdict = (
        ""
        if not fallback.get("ran")
        else ("; fallback passed" if fallback.get("passed") else "; fallback found no passing graph")
    )
    kernels = info.get("cpu_kernels") or {}
    if not kernels.get("agree", True):  # the gate ran the exact Q/DQ arithmetic; this CPU's int8 kernels differ
        verdict += f"; this CPU's fused int8 kernels differ ({kernels.get('accumulation')}, advisory: see parity.json)"
    return (
        f"{info.get('quantized_count')} MatMul/Gemm/Conv quantized, {kept}; {info['calibration']['images']} "
        f"calibration images ({info.get('method')}); {info['tool']['name'].split(' ')[0]} "
        f"{info['tool']['version']}{verdict}"
    )


@handle_errors
def validate(
    bundle: Annotated[
        Path,
        typer.Argument(
            help="A bundle directory written by `peftx merge-export`, or the run directory whose bundle/ it is."
        ),
    ],
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            help="Real images to check on; labelled as DIR/<class>/..., also the accuracy check's.",
            show_default="the run's data",
        ),
    ] = None,
    accuracy_images: Annotated[
        str, typer.Option("--accuracy-images", help="Labelled images the accuracy check measures, 'all', or 0 to skip.")
    ] = "500",
    adapter: Annotated[
        Path | None,
        typer.Option(
            "--adapter",
            help="The run directory / adapter file, if it moved.",
            show_default="the one metadata.json records",
        ),
    ] = None,
    weights: Weights = None,
    tensorrt: Annotated[str, typer.Option("--tensorrt", help="auto, on or off (check model.engine).")] = "auto",
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "-t",
            help="Check readiness for this deployment target (see `peftx targets`).",
            show_default="the bundle's own",
        ),
    ] = None,
    json_out: Json = False,
) -> None:
    """Re-check an existing bundle: artifact hashes, TensorRT readiness for its target, the engine's manifest, then
    parity and accuracy of every artifact against the unmerged model.
    """
    from peftx.deploy import bundle_dir, parse_count
    from peftx.deploy import validate as run

    bundle = bundle_dir(bundle)  # a run directory: its bundle/
    report = run(
        bundle,
        images_dir=images,
        adapter=adapter,
        weights=weights,
        tensorrt=tensorrt,
        progress=None if json_out else Renderer(),
        target=target,
        accuracy_limit=parse_count(accuracy_images),
    )
    if json_out:
        print_json(report.to_json())
        return
    console.print(report.table())
    if report.accuracy is not None:
        console.print(report.accuracy.table())
    console.print(f"bundle {bundle} passed", style="green", markup=False)
