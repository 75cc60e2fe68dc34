"""DeepStream: the model Gst-nvinfer runs (model_deepstream.onnx), its config (config_infer_primary.txt) and labels.txt.

nvinfer normalises every pixel as ``y = net-scale-factor * (x - offsets[c])`` with x in 0..255: ONE scale for all
channels, so the bundle's per-channel ``(x / 255 - mean[c]) / std[c]`` cannot be written in the config exactly. The
model nvinfer runs therefore carries the normalisation inside its graph: :func:`build_onnx` takes the ONNX file the
bundle's engine of this precision is built from (the target's validated graph: its opset, jetpack5's decomposed
LayerNorm, the Q/DQ graph for INT8), prepends ``Div(255) -> Sub(mean) -> Div(std)`` (the same float32 operations, in
the same order, as timm's ToTensor + Normalize and infer.py) and appends a ``Softmax`` as the output the config names.
Its input is RGB pixel values 0..255 (float, NCHW at the network size), so the config uses ``net-scale-factor=1``,
``offsets=0;0;0`` and the normalisation is exact; its output is probabilities, as nvinfer's default classifier parser
assumes (``classifier-threshold`` is a probability). infer.py and every check keep the logits models.

What stays approximate is the geometry: nvinfer scales the whole frame (or object crop) to the network size with its
own filter (``scaling-filter``: :func:`scaling_filter` follows the training interpolation where nvinfer has one), with
no antialiasing and no centre crop (:func:`geometry`). docs/deepstream.md has the measured effect.

What nvinfer does with the engine (DeepStream 6.2 / 6.3 sources, ``sources/libs/nvdsinfer/nvdsinfer_context_impl.cpp``
``generateBackendContext`` / ``buildModel`` and ``nvdsinfer_model_builder.cpp`` ``TrtModelBuilder::buildModel`` /
``configCommonOptions``; the same flow in 7.1 logs): it deserialises ``model-engine-file``; when that fails or
the engine does not fit the config (max batch < ``batch-size``), it builds an engine from ``onnx-file`` with
``network-mode``'s builder flag only (INT8 needs an ``int8-calib-file``, else it "tries FP16 mode"), and saves it as
``<onnx-file path>_b<batch-size>_<gpu|dla><id>_<fp32|fp16|int8>.engine`` next to the ONNX file. So the config names
that very file as ``model-engine-file`` (:func:`engine_file`), which ``build_engine.sh --deepstream`` writes; and where
nvinfer's own build would be wrong (:func:`nvinfer_may_build`) the config has no ``onnx-file``: nvinfer then fails
loudly instead of building a wrong engine.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftx.errors import ExportError
from peftx.tolerances import DEEPSTREAM_GRAPH_FP32, Tolerance

from . import onnx_io
from .targets import TargetProfile

NVINFER_CONFIG, LABELS_FILE = "config_infer_primary.txt", "labels.txt"
DEEPSTREAM_ONNX = "model_deepstream.onnx"
OUTPUT_BLOB = "probabilities"  # the Softmax output the config's output-blob-names names
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}  # nvinfer's network-mode values
GPU_ID = 0  # the config's gpu-id (part of the engine name nvinfer looks for)
# nvinfer labels a frame with its best class only when that probability is > classifier-threshold (the default
# classifier parser, nvdsinfer_context_impl_output_parsing.cpp parseAttributesFromSoftmaxLayers). 0.5: a label only
# where the model puts more than half its probability on one class, which can only be the top class (two classes
# cannot both exceed 0.5), so every label nvinfer attaches is infer.py's top-1. Lower it (any value >= 0; nvinfer
# rejects negative ones) to label more frames; just above 0 labels every frame with its top class, as infer.py does.
CLASSIFIER_THRESHOLD = 0.5
# Gst-nvinfer scaling-filter (NvBufSurfTransform_Inter, sources/includes/nvbufsurftransform.h): 0 nearest,
# 1 bilinear, 2 GPU cubic / VIC 5-tap, 3 GPU super / VIC 10-tap, 4 GPU Lanczos / VIC smart. PIL's box and hamming
# have no nvinfer counterpart: bilinear is the nearest in support.
SCALING_FILTERS = {"nearest": 0, "bilinear": 1, "bicubic": 2, "lanczos": 4}
# scaling-compute-hw: 0 platform default (GPU on dGPU, VIC on Jetson), 1 GPU, 2 VIC (Jetson only).
SCALING_COMPUTE_GPU = 1


@dataclass(frozen=True)
class Filter:
    """nvinfer's scaling-filter for the training interpolation, and what it differs in."""

    value: int
    compute_hw: int  # scaling-compute-hw: 1 (GPU) where the filter's GPU variant is the training one
    exact_kind: bool  # the same kind of filter (nearest/bilinear/cubic/lanczos) as training's
    note: str


def scaling_filter(interpolation: str) -> Filter:
    """nvinfer's ``scaling-filter`` (and ``scaling-compute-hw``) closest to the training interpolation."""
    if interpolation in SCALING_FILTERS:
        value = SCALING_FILTERS[interpolation]
        gpu = value in (2, 4)  # the VIC variant of 2 / 4 is another filter (5-tap / "smart"): pin the GPU's
        note = (
            f"scaling-filter={value}: {interpolation}, as trained"
            + (
                "; scaling-compute-hw=1 (GPU) because on Jetson the platform default is the VIC, whose filter "
                f"{value} is {'a 5-tap' if value == 2 else 'its smart'} filter, not {interpolation} "
                "(set 0 to free the GPU at that cost)"
                if gpu
                else ""
            )
            + "; nvinfer scales without PIL's antialiasing, so a downscaled frame differs slightly"
        )
        return Filter(value, SCALING_COMPUTE_GPU if gpu else 0, True, note)
    return Filter(
        1,
        0,
        False,
        f"scaling-filter=1 (bilinear): nvinfer has no {interpolation} filter (trained with PIL {interpolation}); "
        "check the accuracy on the device",
    )


@dataclass(frozen=True)
class Geometry:
    """nvinfer's resize settings for a crop mode, and whether they reproduce ours."""

    maintain_aspect_ratio: int
    symmetric_padding: int
    matches: bool
    note: str


def geometry(prep: Mapping[str, Any]) -> Geometry:
    """What nvinfer does with a frame against the bundle's crop mode (peftx.preprocess)."""
    mode, crop = prep["crop_mode"], float(prep["crop_pct"])
    _, h, w = prep["input_size"]
    if mode == "squash" and crop == 1.0:
        return Geometry(0, 0, True, f"squash at crop_pct 1: the whole frame scaled to {w}x{h}, as nvinfer does")
    upstream = "crop the frame upstream{} (nvvideoconvert src-crop, or an nvdspreprocess ROI) and let nvinfer scale it"
    if mode == "squash":
        return Geometry(
            0,
            0,
            False,
            f"squash at crop_pct {crop:g}: ours keeps the central {crop:.1%} of each side, "
            f"nvinfer scales the whole frame: {upstream.format('')}, or re-train with --crop-pct 1",
        )
    if mode == "center":
        return Geometry(
            0,
            0,
            False,
            f"center: ours keeps the aspect ratio and centre-crops {w}:{h} "
            f"({crop:.1%} of the shorter side); nvinfer cannot crop: {upstream.format(' to that centred region')}, "
            "or re-train with --crop-mode squash",
        )
    return Geometry(
        1,
        1,
        False,
        "border: both keep the aspect ratio and pad symmetrically, but nvinfer pads black "
        "where ours pads the mean colour"
        + (f", and ours then keeps the central {crop:.1%}" if crop < 1.0 else "")
        + "; re-train with --crop-mode squash for an exact match",
    )


def engine_file(batch: int, precision: str, gpu_id: int = GPU_ID) -> str:
    """The engine name nvinfer writes for DEEPSTREAM_ONNX (and looks for, as the config's model-engine-file):
    TrtModelBuilder::buildModel's ``modelPath + "_b" + maxBatchSize + "_" + devId + "_" + networkMode2Str``."""
    return f"{DEEPSTREAM_ONNX}_b{batch}_gpu{gpu_id}_{precision}.engine"


def nvinfer_may_build(precision: str, target: TargetProfile | None) -> tuple[bool, str]:
    """Whether nvinfer's own engine build from onnx-file gives the engine build_engine.sh builds; if not, why."""
    if precision == "int8":
        return False, (
            "nvinfer sets TensorRT's INT8 flag only with an int8-calib-file (implicit calibration); without one it "
            "falls back to the FP16 flag alone, and TensorRT does not build a Q/DQ graph without INT8 enabled: "
            "a build of minutes that fails, or at best not the INT8 engine validated here"
        )
    if precision == "fp16" and target is not None and target.fp16_fp32_nodes:
        return False, (
            "this target keeps LayerNorm FP32 in FP16 engines (TensorRT 8.5 has no LayerNormalization); nvinfer's "
            "FP16 build sets the FP16 flag only and would run it in FP16"
        )
    if precision == "fp16" and target is not None and target.fp16 == "fp16_onnx":
        return False, "TensorRT 11 has no FP16 builder flag: only build_engine.sh builds this target's FP16 engine"
    return True, ""


def source_file(precision: str, target: TargetProfile | None) -> str:
    """The shipped ONNX file DEEPSTREAM_ONNX is made from: the one build_engine.sh builds this precision from."""
    if precision == "int8":
        return "model_int8.onnx"
    if precision == "fp16" and target is not None and target.fp16 == "fp16_onnx":
        return "model_fp16.onnx"
    return "model.onnx"


# --- the model nvinfer runs -----------------------------------------------------------------------------------------


def build_onnx(source: Path, out: Path, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """Write ``out``: ``source`` with (x / 255 - mean) / std before its input and a Softmax after its output.

    Every node, initialiser and name of ``source`` is kept (build_engine.sh's --layerPrecisions names still match);
    the graph input keeps its name, shape and float32 type, the output becomes OUTPUT_BLOB. Returns the facts
    metadata.json records.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx_io.load(source)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"{source.name} has {len(inputs)} inputs and {len(graph.output)} outputs; DeepStream's model needs "
            "one of each",
            "report this model",
        )
    graph_input, graph_output = inputs[0], graph.output[0]
    if graph_input.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ExportError(f"{source.name}'s input is not float32", "report this model")
    channels = graph_input.type.tensor_type.shape.dim[1].dim_value
    if channels != len(mean) or channels != len(std):
        raise ExportError(f"{source.name} takes {channels} channels, mean/std have {len(mean)}", "report this model")
    pixels, logits = graph_input.name, graph_output.name
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | initializers | {pixels}
    prefix = "peftx_deepstream"
    if any(name.startswith(prefix) for name in taken):
        raise ExportError(f"{source.name} already has {prefix} tensors (made twice?)", "export the bundle again")
    normalised = f"{prefix}/normalised"
    for node in graph.node:  # the model now reads the normalised tensor where it read the graph input
        node.input[:] = [normalised if name == pixels else name for name in node.input]
    shape = [1, channels, 1, 1]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(255.0, np.float32), f"{prefix}/255"),
            numpy_helper.from_array(np.asarray(mean, np.float32).reshape(shape), f"{prefix}/mean"),
            numpy_helper.from_array(np.asarray(std, np.float32).reshape(shape), f"{prefix}/std"),
        ]
    )
    head = [
        helper.make_node("Div", [pixels, f"{prefix}/255"], [f"{prefix}/unit"], name=f"{prefix}/Div_255"),
        helper.make_node("Sub", [f"{prefix}/unit", f"{prefix}/mean"], [f"{prefix}/centred"], name=f"{prefix}/Sub_mean"),
        helper.make_node("Div", [f"{prefix}/centred", f"{prefix}/std"], [normalised], name=f"{prefix}/Div_std"),
    ]
    nodes = [*head, *graph.node, helper.make_node("Softmax", [logits], [OUTPUT_BLOB], name=f"{prefix}/Softmax", axis=1)]
    del graph.node[:]
    graph.node.extend(nodes)
    output = onnx.ValueInfoProto()
    output.CopyFrom(graph_output)
    output.name = OUTPUT_BLOB
    del graph.output[:]
    graph.output.append(output)
    facts = {
        "source_onnx": source.name,
        "input": f"{pixels}: RGB pixel values 0..255, float32 NCHW (normalised in the graph)",
        "output": f"{OUTPUT_BLOB}: softmax over the classes (the logits of {source.name}, then Softmax)",
        "normalisation": "(x / 255 - mean[c]) / std[c] in float32, inside the graph",
    }
    props = {p.key: p.value for p in model.metadata_props}
    props["peftx_deepstream"] = json.dumps(facts, sort_keys=True)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx_io.save(model, out)
    onnx_io.check(out)
    return facts


def pixel_values(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised float32 images back to the 8-bit pixel values they came from (rounded, as floats)."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return np.clip(np.rint((images * s + m) * 255.0), 0, 255).astype(np.float32)


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x / 255 - mean) / std in float32, in infer.py's (and timm's) order: what the graph must reproduce."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((pixels.astype(np.float32) / np.float32(255.0)) - m) / s


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Exactness:
    """The DeepStream graph on pixel values against softmax(the source graph on the normalised pixels)."""

    images: int
    max_abs_prob: float
    top1_agreement: float
    max_sum_error: float  # worst |sum of probabilities - 1|
    tolerance: str
    passed: bool


def check_exact(
    ds_path: Path, source_path: Path, pixels: np.ndarray, mean: Sequence[float], std: Sequence[float], tol: Tolerance
) -> Exactness:
    """Run both files under ONNX Runtime on the same pixels (the DeepStream graph takes them raw, the source graph
    takes them normalised by numpy): the graph's normalisation and softmax must be the contract's, to FP32 noise."""
    import onnxruntime as ort

    def run(path: Path, feed: np.ndarray) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {session.get_inputs()[0].name: feed})[0], np.float64)

    probs = run(ds_path, pixels.astype(np.float32))
    expected = softmax(run(source_path, normalise(pixels, mean, std)))
    err = float(np.abs(probs - expected).max())
    agree = float(np.mean(probs.argmax(1) == expected.argmax(1)))
    sums = float(np.abs(probs.sum(axis=1) - 1.0).max())
    passed = err <= tol.bound(1.0) and agree >= tol.min_top1 and sums <= tol.bound(1.0)
    return Exactness(len(pixels), err, agree, sums, tol.name, passed)


# --- the config -----------------------------------------------------------------------------------------------------


def labels_text(class_names: Sequence[str]) -> tuple[str, list[str]]:
    """labels.txt for an nvinfer classifier (one output layer: every label on one line, ';'-separated) and the
    warnings for names that had to change (a ';' or line break inside a name would split it)."""
    cleaned, warnings = [], []
    for name in class_names:
        fixed = " ".join(str(name).replace(";", ",").split())
        if fixed != name:
            warnings.append(f"{LABELS_FILE}: class name {name!r} written as {fixed!r} (nvinfer splits labels at ';')")
        cleaned.append(fixed)
    return ";".join(cleaned) + "\n", warnings


def render_config(
    prep: Mapping[str, Any],
    *,
    precision: str,
    batch: int,
    target: TargetProfile | None = None,
    threshold: float = CLASSIFIER_THRESHOLD,
) -> tuple[str, dict[str, Any]]:
    """config_infer_primary.txt (a primary classifier on full frames) and metadata.json's ``deepstream`` entry."""
    if not 0.0 < threshold < 1.0:
        raise ExportError(f"classifier-threshold {threshold} is not a probability in (0, 1)", "pass 0 < t < 1")
    geo, filt = geometry(prep), scaling_filter(str(prep.get("interpolation") or "bicubic"))
    _, h, w = prep["input_size"]
    engine = engine_file(batch, precision)
    may_build, why = nvinfer_may_build(precision, target)
    paragraphs = [
        "Gst-nvinfer config for this peftx bundle: a primary classifier on full frames (deepstream-app "
        "[primary-gie] config-file=, or nvinfer config-file-path=). Paths are relative to this file (nvinfer "
        "resolves them so).",
        f"Model: {DEEPSTREAM_ONNX} = the bundle's model with its preprocessing and a softmax inside. Input: RGB "
        f"pixel values 0..255 (float, NCHW, 3x{h}x{w}), normalised in the graph as (x/255 - mean[c]) / std[c]; "
        f"output {OUTPUT_BLOB}: a softmax (sums to 1). nvinfer computes y = net-scale-factor * (x - offsets[c]): "
        "with 1 and 0;0;0 it passes the pixels through, so the normalisation is exact. Do not change them.",
        "classifier-threshold is a probability: nvinfer labels a frame with its top class only if that class's "
        f"probability is > {threshold:g}"
        + (" (only the top class can pass)" if threshold >= 0.5 else "")
        + ". Lower it to label more frames; just above 0 labels every frame with its top class, as infer.py does.",
        f"Resize: {geo.note}.",
        f"Filter: {filt.note}.",
        f"Engine: build it first, on the device: ./build_engine.sh {precision} --deepstream (writes {engine}, the "
        "name nvinfer itself gives an engine built from this ONNX at this batch-size, gpu-id and network-mode; "
        "change batch-size or gpu-id and that name changes: edit model-engine-file and rebuild).",
        (
            "If the engine does not load (e.g. another TensorRT), nvinfer builds one from onnx-file with "
            "network-mode's flag and saves it under this same name: it rebuilds once, not on every start."
            if may_build
            else f"No onnx-file on purpose: {why}. nvinfer would build such an engine silently when "
            "model-engine-file does not load; without onnx-file it stops with an error instead: then run "
            "./build_engine.sh again on this device."
        ),
    ]
    lines = [f"# {line}" for text in paragraphs for line in textwrap.wrap(text, 116, break_on_hyphens=False)]
    lines += [
        "[property]",
        f"gpu-id={GPU_ID}",
        "net-scale-factor=1",
        "offsets=" + ";".join("0" for _ in prep["mean"]),
        "model-color-format=0",
        f"infer-dims=3;{h};{w}",
        "network-input-order=0",
        *([f"onnx-file={DEEPSTREAM_ONNX}"] if may_build else []),
        f"model-engine-file={engine}",
        f"labelfile-path={LABELS_FILE}",
        f"batch-size={batch}",
        "## 0=FP32, 1=INT8, 2=FP16",
        f"network-mode={NETWORK_MODE[precision]}",
        "network-type=1",
        "process-mode=1",
        "gie-unique-id=1",
        f"output-blob-names={OUTPUT_BLOB}",
        f"classifier-threshold={threshold:g}",
        f"maintain-aspect-ratio={geo.maintain_aspect_ratio}",
        f"symmetric-padding={geo.symmetric_padding}",
        f"scaling-filter={filt.value}",
        f"scaling-compute-hw={filt.compute_hw}",
    ]
    entry = {
        "config": NVINFER_CONFIG,
        "labels": LABELS_FILE,
        "onnx": DEEPSTREAM_ONNX,
        "output_blob": OUTPUT_BLOB,
        "classifier_threshold": threshold,
        "engine_file": engine,
        "network_mode": NETWORK_MODE[precision],
        "nvinfer_may_build": may_build,
        "why_not": why or None,
        "scaling_filter": asdict(filt),
        "geometry": asdict(geo),
    }
    return "\n".join(lines) + "\n", entry


def write(
    work: Path,
    source: Path,
    prep: Mapping[str, Any],
    class_names: Sequence[str],
    *,
    precision: str,
    batch: int,
    target: TargetProfile,
    images: np.ndarray,
) -> tuple[dict[str, Any], list[str]]:
    """Write model_deepstream.onnx (from ``source``), config_infer_primary.txt and labels.txt into ``work``, and
    check the graph is exact on ``images`` (the bundle's real images, normalised). Returns metadata.json's entry and
    the warnings. Raises ExportError when the graph is not exact (a wrong graph must not ship)."""
    facts = build_onnx(source, work / DEEPSTREAM_ONNX, prep["mean"], prep["std"])
    exact = check_exact(
        work / DEEPSTREAM_ONNX,
        source,
        pixel_values(images, prep["mean"], prep["std"]),
        prep["mean"],
        prep["std"],
        DEEPSTREAM_GRAPH_FP32,
    )
    if not exact.passed:
        raise ExportError(
            f"{DEEPSTREAM_ONNX} differs from softmax({source.name}) by {exact.max_abs_prob:.3g} in probability "
            f"(top-1 agreement {exact.top1_agreement:.1%}) on the same pixels",
            "report this model: the in-graph normalisation or softmax is wrong",
        )
    text, entry = render_config(prep, precision=precision, batch=batch, target=target)
    labels, warnings = labels_text(class_names)
    (work / NVINFER_CONFIG).write_text(text, encoding="utf-8")
    (work / LABELS_FILE).write_text(labels, encoding="utf-8")
    return {**entry, **facts, "exactness": asdict(exact)}, warnings
