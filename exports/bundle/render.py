"""build_engine.sh and the bundle's README.md, rendered from ``exports/templates``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .. import deepstream as deepstream_mod
from .. import onnx_io
from ..parity import (
    ParityResult,
)
from ..targets import TargetProfile, resolve_target
from ..tensorrt import (
    resolve_target_here,
)
from .format import DECODING_FILE, INT8_FILE
from .precision import PRECISIONS, Precision, engine_tolerance, quantized


def _template(name: str) -> str:
    return resources.files("peftx.exports").joinpath("templates").joinpath(name).read_text(encoding="utf-8")


def _decoding_source() -> str:
    """peftx/image_decoding.py, which the bundle ships beside infer.py: one file decodes images in training and on the
    device (it imports nothing of peftx)."""
    return resources.files("peftx").joinpath(DECODING_FILE).read_text(encoding="utf-8")


def _check_atol(ort_result: ParityResult) -> dict[str, float]:
    """Polygraphy re-check bounds (engine vs ONNX Runtime) from peftx's tolerances at this model's logit scale."""
    scale = ort_result.overall.ref_max_abs
    return {precision: engine_tolerance(precision).bound(scale) for precision in PRECISIONS}


def render_build_script(
    onnx_path: str | Path,
    batch: tuple[int, int, int],
    precision: Precision,
    *,
    target: TargetProfile | None = None,
    ready: bool = True,
    fp32_layers: Sequence[str] = (),
    check_atol: Mapping[str, float] | None = None,
) -> str:
    """build_engine.sh for this graph: input name and C/H/W from the ONNX, min/opt/max from ``batch``, the target's
    floor and FP32 layers, and whether its readiness passed (the script refuses to build an unready bundle)."""
    target = target or resolve_target_here(None)
    graph = onnx_io.load(onnx_path, weights=False).graph
    initializers = {t.name for t in graph.initializer}
    tensor = next(i for i in graph.input if i.name not in initializers)
    rest = [d.dim_value for d in tensor.type.tensor_type.shape.dim][1:]
    shape = lambda n: "x".join(str(d) for d in (n, *rest))  # noqa: E731 - trtexec's NxCxHxW
    atol = {"fp32": 1e-3, "fp16": 1e-2, "int8": 1e-1, **(check_atol or {})}
    label = _target_label(target)
    values = {
        "INPUT_NAME": tensor.name,
        "INPUT_DIMS": "batch x " + " x ".join(map(str, rest)),
        "PRECISION": precision,
        "MIN_BATCH": batch[0],
        "OPT_BATCH": batch[1],
        "MAX_BATCH": batch[2],
        "MIN_SHAPE": shape(batch[0]),
        "OPT_SHAPE": shape(batch[1]),
        "MAX_SHAPE": shape(batch[2]),
        "OPT_BATCH_DIMS": ",".join(str(d) for d in (batch[1], *rest)),
        "TARGET": target.name,
        "TARGET_LABEL": label,
        "TARGET_MIN": target.tensorrt_min,
        "READY": int(bool(ready)),
        "LAYER_SPEC": ",".join(f"{name}:fp32" for name in fp32_layers),
        "FP32_LAYER_COUNT": len(fp32_layers),
        "INT8_FLAGS": " ".join(_int8_trtexec_flags(target)),
        "DS_ONNX": deepstream_mod.DEEPSTREAM_ONNX,
        # graphs past 2 GB keep their weights in <graph>.data beside them: the script refuses to build without it
        "DATA_FILES": " ".join(
            sorted(data.name for graph in Path(onnx_path).parent.glob("*.onnx") for data in onnx_io.data_files(graph))
        ),
        "DS_ENGINE": deepstream_mod.engine_file(batch[1], precision),
        "DS_SOURCE": deepstream_mod.source_file(precision, target),
        "CHECK_ATOL_FP32": f"{atol['fp32']:.3g}",
        "CHECK_ATOL_FP16": f"{atol['fp16']:.3g}",
        # An INT8 engine is compared with its own Q/DQ graph under ONNX Runtime (model.onnx is the FP32 function it
        # approximates; its task accuracy is what `infer.py --check` and the bundle's gate judge).
        "INT8_CHECK": (
            "  # int8 engine: against the Q/DQ graph it was built from (logits move by design; accuracy: "
            "infer.py --check)\n"
            f"  polygraphy run {INT8_FILE} --onnxrt --load-inputs check_inputs.json "
            "--save-outputs check_onnxrt_int8.json\n"
            "  polygraphy run model.engine --model-type engine --trt --load-inputs check_inputs.json "
            f"--load-outputs check_onnxrt_int8.json --check-error-stat max --atol {atol['int8']:.3g} --rtol 0\n"
            if quantized(precision)
            else ""
        ),
    }
    text = _template("build_engine.sh.in")
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    return text


def _target_label(target: TargetProfile) -> str:
    return (
        target.name
        if not target.requested or target.requested == target.name
        else f"{target.requested} ({target.name})"
    )


def render_readme(
    preprocessing: Mapping[str, Any], class_names: Sequence[str], precision: Precision, target: TargetProfile
) -> str:
    """README.md for the person at the device (templates/README.md.in): what to install per JetPack, how to build,
    check and run this bundle, and what only the device can tell (and the ``infer.py --check`` line that tells it)."""
    _, height, width = (int(v) for v in preprocessing["input_size"])
    int8 = quantized(precision)
    values = {
        "CLASSES": len(class_names),
        "INPUT": f"{height}x{width}",
        "INTERPOLATION": preprocessing.get("interpolation") or "bilinear",
        "CROP_PCT": preprocessing.get("crop_pct") or 1.0,
        "CROP_MODE": preprocessing.get("crop_mode") or "center",
        "PRECISION": precision,
        "TARGET_LABEL": _target_label(target),
        "TARGET_MIN": target.tensorrt_min,
        "INT8_FILE_ROW": f", `{INT8_FILE}`" if int8 else "",
        "INT8_WORD": "; INT8 Q/DQ" if int8 else "",
        "INT8_ARG": "|int8" if int8 else "",
    }
    text = _template("README.md.in")
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    return text


def _int8_trtexec_flags(target: TargetProfile) -> tuple[str, ...]:
    """trtexec's INT8 flags on 8.x/10.x (the 8.x/10.x profiles agree: --int8); 11 has none and is handled apart."""
    flags = target.int8.trtexec_flags if target.int8.trtexec_flags else resolve_target("trt10").int8.trtexec_flags
    return flags
