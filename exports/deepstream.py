"""DeepStream: the Gst-nvinfer config (config_infer_primary.txt) and labels.txt of a bundle, and what nvinfer's
preprocessing can and cannot express of the bundle's contract.

nvinfer scales the frame (or object crop) to the network's W x H, optionally keeping the aspect ratio by padding
(``maintain-aspect-ratio``, ``symmetric-padding``), then normalises every pixel as ``y = net-scale-factor *
(x - offsets[c])`` with x in 0..255 (the Gst-nvinfer documentation). The contract is ``(x / 255 - mean[c]) / std[c]``:
``offsets = 255 * mean`` is exact, but the per-channel scale ``1 / (255 * std[c])`` has to become ONE number, so
:func:`single_scale` picks the one with the smallest worst-case error and reports that error. nvinfer cannot
centre-crop either: :func:`geometry` says, per crop mode, whether its resize matches ours and what to do when not.
Neither file is hashed in metadata.json: they are meant to be edited (batch-size, paths, gpu-id).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

NVINFER_CONFIG, LABELS_FILE = "config_infer_primary.txt", "labels.txt"
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}  # nvinfer's network-mode values


@dataclass(frozen=True)
class SingleScale:
    """The closest nvinfer normalisation to per-channel (x / 255 - mean) / std."""

    net_scale_factor: float
    offsets: tuple[float, ...]  # 255 * mean: exact
    exact_scales: tuple[float, ...]  # 1 / (255 * std[c]): what each channel would need
    max_abs_error: float  # worst |nvinfer's y - the contract's y| over every channel and pixel value 0..255
    max_rel_error: float  # worst |net-scale-factor / exact_scale - 1| over the channels
    exact: bool  # all std equal: one scale is the exact answer


def single_scale(mean: Sequence[float], std: Sequence[float]) -> SingleScale:
    """The net-scale-factor k minimising max over c and x in 0..255 of |k - k_c| * |x - 255 mean_c|.

    Channel c's error is |k - k_c| * R_c with R_c = max(255 mean_c, 255 (1 - mean_c)) (the farthest pixel value
    from the offset), a minimax of weighted distances: the optimum is a k_c or where two channels' errors are equal,
    k = (k_i R_i + k_j R_j) / (R_i + R_j); every candidate is evaluated and the best kept.
    """
    offsets = tuple(255.0 * m for m in mean)
    scales = tuple(1.0 / (255.0 * s) for s in std)
    reach = [max(o, 255.0 - o) for o in offsets]

    def worst(k: float) -> float:
        return max(abs(k - kc) * r for kc, r in zip(scales, reach, strict=True))

    candidates = list(scales) + [
        (scales[i] * reach[i] + scales[j] * reach[j]) / (reach[i] + reach[j])
        for i, j in itertools.combinations(range(len(scales)), 2)
    ]
    best = min(candidates, key=worst)
    return SingleScale(
        best, offsets, scales, worst(best), max(abs(best / kc - 1.0) for kc in scales), len(set(std)) == 1
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
    filt = (
        f"nvinfer scales with its own filter (scaling-filter; ours is PIL {prep['interpolation']} with "
        "antialiasing), so pixels differ slightly: check accuracy on the device"
    )
    if mode == "squash" and crop == 1.0:
        return Geometry(0, 0, True, f"squash at crop_pct 1: the whole frame scaled to {w}x{h}, as nvinfer does; {filt}")
    upstream = "crop the frame upstream (nvvideoconvert src-crop, or an nvdspreprocess ROI) and let nvinfer scale it"
    if mode == "squash":
        return Geometry(
            0,
            0,
            False,
            f"squash at crop_pct {crop:g}: ours keeps the central {crop:.1%} of each side, "
            f"nvinfer scales the whole frame: {upstream}, or re-train with --crop-pct 1",
        )
    if mode == "center":
        return Geometry(
            0,
            0,
            False,
            f"center: ours keeps the aspect ratio and centre-crops {w}:{h} "
            f"({crop:.1%} of the shorter side); nvinfer cannot crop: {upstream} to that "
            "centred region, or re-train with --crop-mode squash",
        )
    return Geometry(
        1,
        1,
        False,
        "border: both keep the aspect ratio and pad symmetrically, but nvinfer pads black "
        "where ours pads the mean colour (0 after normalisation)"
        + (f", and ours then keeps the central {crop:.1%}" if crop < 1.0 else "")
        + "; re-train with --crop-mode squash for an exact match",
    )


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
    prep: Mapping[str, Any], *, precision: str, onnx_file: str, batch: int, output_name: str, tensorrt_note: str = ""
) -> tuple[str, dict[str, Any]]:
    """config_infer_primary.txt (a primary classifier on full frames) and metadata.json's ``deepstream`` entry."""
    scale, geo = single_scale(prep["mean"], prep["std"]), geometry(prep)
    _, h, w = prep["input_size"]
    error = (
        "exact (one std for every channel)"
        if scale.exact
        else f"max error {scale.max_abs_error:.3g} on the normalised input ({scale.max_rel_error:.2%} of the "
        "per-channel scale): check accuracy on the device, or normalise per channel in your own code"
    )
    lines = [
        "# Gst-nvinfer config for this peftx bundle: a primary classifier on full frames (edit paths and batch-size).",
        "# nvinfer computes y = net-scale-factor * (x - offsets[c]), x in 0..255, ONE scale for all channels; the",
        "# model wants (x/255 - mean[c]) / std[c]. offsets = 255 * mean (exact); net-scale-factor: the single scale",
        f"# closest to 1/(255*std[c]) = {';'.join(f'{k:.6g}' for k in scale.exact_scales)}: {error}.",
        f"# Resize: {geo.note}.",
        "# model-engine-file: build it first with ./build_engine.sh (the target's precision rules and checks);",
        f"# nvinfer builds one from onnx-file only if it is missing.{(' ' + tensorrt_note) if tensorrt_note else ''}",
        "# The output is logits, not probabilities: a frame whose top logit is below classifier-threshold gets no",
        "# label; lower it (on the logit scale) to always get the top class, as infer.py does.",
        "[property]",
        "gpu-id=0",
        f"net-scale-factor={scale.net_scale_factor:.9g}",
        f"offsets={';'.join(f'{o:.6g}' for o in scale.offsets)}",
        "model-color-format=0",
        f"infer-dims=3;{h};{w}",
        "network-input-order=0",
        f"onnx-file={onnx_file}",
        "model-engine-file=model.engine",
        f"labelfile-path={LABELS_FILE}",
        f"batch-size={batch}",
        "## 0=FP32, 1=INT8, 2=FP16",
        f"network-mode={NETWORK_MODE[precision]}",
        "network-type=1",
        "process-mode=1",
        "gie-unique-id=1",
        f"output-blob-names={output_name}",
        "classifier-threshold=0.0",
        f"maintain-aspect-ratio={geo.maintain_aspect_ratio}",
        f"symmetric-padding={geo.symmetric_padding}",
        "scaling-filter=1",
    ]
    entry = {"config": NVINFER_CONFIG, "labels": LABELS_FILE, **asdict(scale), "geometry": asdict(geo)}
    return "\n".join(lines) + "\n", entry
