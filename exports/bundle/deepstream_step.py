"""Step: the DeepStream model, its Gst-nvinfer config and labels, checked for the target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import deepstream as deepstream_mod
from ..tensorrt_ops import TargetReadiness, check_target_readiness
from .checks import _handle_readiness
from .request import BundleRequest, Progress


def _write_deepstream(
    work: Path, opt: BundleRequest, readiness: TargetReadiness, images: np.ndarray, warnings: list[str], say: Progress
) -> dict[str, Any]:
    """model_deepstream.onnx + config_infer_primary.txt + labels.txt (deepstream.py), made from the ONNX file the
    target's engine of this precision is built from (build_engine.sh's choice), and checked for the target."""
    source = work / deepstream_mod.source_file(opt.precision, opt.target)
    say(f"writing the DeepStream model and config (from {source.name})")
    entry, more = deepstream_mod.write(
        work,
        source,
        opt.preprocessing,
        opt.class_names,
        precision=opt.precision,
        batch=opt.batch[1],
        target=opt.target,
        images=images,
    )
    warnings.extend(more)
    checked = check_target_readiness(
        {deepstream_mod.DEEPSTREAM_ONNX: work / deepstream_mod.DEEPSTREAM_ONNX}, opt.target
    )
    readiness.files.update(checked.files)  # trt_readiness.json covers it like the other shipped graphs
    for name, problems in checked.newer.items():
        readiness.newer.setdefault(name, []).extend(problems)
    _handle_readiness(checked.problems, opt.tensorrt, warnings, opt.target)
    return entry
