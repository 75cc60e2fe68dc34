"""The one typed request of a bundle (``BundleRequest``, built with keywords by ``write_bundle``), the report it
yields, and the checks of write_bundle's arguments."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from peftx.errors import UsageError
from peftx.preprocess import contract

from .. import int8 as int8_mod
from ..accuracy import AccuracySet
from ..parity import (
    ParityReport,
)
from ..targets import TargetProfile
from ..tensorrt import (
    TensorRTMode,
)
from ..tensorrt_ops import TargetReadiness
from .format import target_summary
from .precision import Precision, check_precision, quantized

# Odd batch sizes catch batch-mixing reshapes and padding bugs that even sizes can hide.
PARITY_BATCHES = (1, 3, 7)


RANDOM_BATCH = 3


# Images used to find FP16 large-magnitude nodes: enough for the activation range; bounds memory (~1.5 GB, ViT-B).
FP16_CALIBRATION_IMAGES = 8


_DATA_CONFIG_KEYS = ("input_size", "interpolation", "crop_pct", "mean", "std")


Progress = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class BundleRequest:
    """write_bundle's settings, resolved and validated: the one typed request every step reads."""

    input_size: tuple[int, int, int]
    preprocessing: dict[str, Any]
    class_names: list[str]
    provenance: Mapping[str, Any]
    batch: tuple[int, int, int]
    precision: Precision
    tensorrt: TensorRTMode
    use_trt: bool
    trt_message: str
    simplify: bool
    parity_max_batch: int
    timing_cache: str | Path | None
    target: TargetProfile
    layernorms: int  # LayerNorm modules of the model: a decomposed export must show exactly this many
    accuracy_set: AccuracySet | None = None  # labelled images for the accuracy gate (None: not measured)
    int8: int8_mod.Int8Request | None = None  # calibration images and method (precision "int8")


@dataclass
class BundleReport:
    out_dir: Path
    status: Literal["ok", "failed"]
    parity: ParityReport
    readiness: TargetReadiness
    sha256: dict[str, str]
    tensorrt: dict[str, Any]
    simplify: dict[str, Any] | None
    fp16: dict[str, Any]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    fp32_nodes: list[str] = field(default_factory=list)  # the target's FP32 nodes in FP16 builds
    reference_set: dict[str, Any] = field(default_factory=dict)  # metadata.json's entry (reference_step.py)
    deepstream: dict[str, Any] = field(default_factory=dict)  # metadata.json's entry (deepstream.py)
    int8: dict[str, Any] | None = None  # how model_int8.onnx was made (precision "int8")

    @property
    def target(self) -> TargetProfile:
        return self.readiness.target

    def to_json(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "status": self.status,
            "target": target_summary(self.target),
            "parity": self.parity.to_json(),
            "readiness": self.readiness.to_json(),
            "sha256": self.sha256,
            "tensorrt": self.tensorrt,
            "simplify": self.simplify,
            "fp16": self.fp16,
            "int8": self.int8,
            "timings": self.timings,
            "warnings": self.warnings,
        }


def parity_batches(batch: tuple[int, int, int], parity_max_batch: int = 32) -> list[int]:
    """1, 3, 7 and the profile's max (capped for CPU cost), clamped into the batch profile [min, max]."""
    low, _, high = batch
    wanted = (*PARITY_BATCHES, min(high, parity_max_batch))
    return sorted({min(max(b, low), high) for b in wanted})


def _validate_inputs(input_size, data_config, class_names, images, batch, precision, parity_max_batch) -> np.ndarray:
    check_precision(precision)
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise UsageError(
            f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch}", "e.g. batch=(1, 8, 32)"
        )
    if parity_max_batch < 1:
        raise UsageError(f"parity_max_batch must be >= 1, got {parity_max_batch}", "use the default of 32")
    missing = [key for key in _DATA_CONFIG_KEYS if key not in data_config]
    if missing:
        raise UsageError(f"data_config lacks {', '.join(missing)}", "pass timm.data.resolve_data_config(model=...)")
    contract(data_config)  # a crop mode, interpolation or crop_pct the shipped infer.py cannot reproduce fails here
    if tuple(data_config["input_size"]) != tuple(input_size):
        raise UsageError(
            f"data_config input_size {tuple(data_config['input_size'])} != input_size {tuple(input_size)}",
            "export at the size the preprocessing produces",
        )
    if not class_names:
        raise UsageError("class_names is empty", "pass one name per output class")
    return _images_array(images, input_size)


def _images_array(images: torch.Tensor | np.ndarray, input_size: Sequence[int]) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(input_size) or len(array) == 0:
        raise UsageError(
            f"images must be [N, {', '.join(map(str, input_size))}] with N >= 1, got {list(array.shape)}",
            "pass real images preprocessed with the bundle's data_config",
        )
    if not np.isfinite(array).all():
        raise UsageError("images contain NaN or Inf", "check the preprocessing")
    return np.ascontiguousarray(array, dtype=np.float32)


def _check_class_count(expected: Mapping[str, np.ndarray], class_names: Sequence[str]) -> None:
    width = next(iter(expected.values())).shape[-1]
    if width != len(class_names):
        raise UsageError(
            f"the model has {width} outputs but {len(class_names)} class names were given",
            "pass one name per output class",
        )


def _check_int8_request(
    precision: Precision, request: int8_mod.Int8Request | None, accuracy_set: AccuracySet | None, target: TargetProfile
) -> None:
    """precision "int8" needs calibration images, labelled images for its gate, and a target that takes Q/DQ."""
    if not quantized(precision):
        return
    int8_mod.check_target(target)
    if request is None:
        raise UsageError("precision 'int8' needs calibration images", "pass int8=int8.select_calibration(...)")
    if accuracy_set is None:
        raise UsageError(
            "--precision int8 needs labelled images: task accuracy is the only honest INT8 gate",
            "drop --accuracy-images 0, or pass --images DIR/<class>/... with labelled images",
        )
