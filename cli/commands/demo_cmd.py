"""`peftx demo`: the main job on the embedded default, no arguments needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import handle_errors
from ..options import Json, Method
from ..output import console, key_values, print_json
from .train_cmd import _run_with_progress


@handle_errors
def demo(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Run directory.", show_default="runs/<method>-demo-<time>")
    ] = None,
    method: Method = "rlrr",
    json_out: Json = False,
) -> None:
    """Train on the embedded default (real DINOv2 ViT-S/14 + sklearn digits), merge, export ONNX, validate."""
    from peftx.pipeline import run_demo

    result = _run_with_progress(lambda progress: run_demo(output, method=method, progress=progress), json_out)
    if json_out:
        print_json(result)
        return
    console.print(key_values("peftx demo: results", demo_items(result)))


def demo_items(result: dict) -> dict[str, str]:
    """The demo's results, for people (the JSON has every digit)."""
    return {
        "test accuracy": f"{100 * result['test_accuracy']:.2f} % (epoch {result['best_epoch']}, chosen on validation)",
        "training time": f"{result['train_seconds']:.0f} s",
        "trainable params": f"{result['trainable_params']:,}",
        "ONNX vs unmerged": f"max |Δ| {result['onnx_fp32_max_abs_err']:.1e}, "
        f"top-1 agreement {100 * result['onnx_fp32_top1_agreement']:.0f} %",
        "bundle accuracy": (
            f"{100 * result['bundle_test_accuracy']:.2f} % (model.onnx on the "
            f"{result['bundle_accuracy_images']} test images through infer.py's preprocessing)"
            if result.get("bundle_test_accuracy") is not None
            else "not measured"
        ),
        "bundle status": result["bundle_status"],
        "run directory": str(result["run_dir"]),
        "bundle": f"{result['bundle']}  ({', '.join(result['files'])})",
        "tensorrt": result["tensorrt"],
        "try it": f"python {result['bundle']}/infer.py IMAGE  (on the device: infer.py --check)",
    }
