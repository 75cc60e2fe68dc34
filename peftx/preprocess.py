"""The preprocessing contract: ONE definition of how an image becomes the model's input tensor.

A run records its contract in the adapter file (``data_config``: timm's data-config fields, ``crop_mode``
included). Training's evaluation, ``peftx eval``, the bundle's parity and accuracy checks, metadata.json and the
bundle's standalone ``infer.py`` all apply that record, so the deployed model sees the pixels it was trained and
evaluated on. The evaluation transform is timm's own (``timm.data.create_transform(is_training=False)``: resize
by ``crop_pct``, crop per ``crop_mode``, ToTensor, Normalize); ``infer.py`` re-implements exactly that with PIL and
numpy (no torch on a device), and a test holds the two equal to the bit on raw non-square files.

Training applies the same geometry, plus an optional horizontal flip: no random crops (the VTAB-1k recipe resizes
whole images), so what training sees is what evaluation and the device see. peftx's own default (``TRAINING``) is
timm's ``squash`` mode at crop_pct 1.0 — the whole image resized to H x W — the paper's recipe and what peftx did
before the contract was recorded; ``center`` (timm's ImageNet evaluation: keep the aspect ratio, centre-crop) and
``border`` (keep the aspect ratio, pad) are there for a run that asks for them (``--crop-mode``, ``--crop-pct``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from .errors import UsageError
from .image_decoding import DECODE_RULE as DECODE_RULE  # re-exported: the contract's decoding rule, by name

CROP_MODES = ("squash", "center", "border")  # timm's eval crop modes (transforms_imagenet_eval)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # PIL filters, as timm names them
KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")

# peftx's training default: the whole image squashed to the input size, nothing cropped (VTAB-1k's recipe).
TRAINING: dict[str, Any] = {"crop_mode": "squash", "crop_pct": 1.0}


def contract(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The six contract fields of ``cfg``, normalised (lists of plain numbers) and checked.

    A config without ``crop_mode`` is one written before the contract was recorded: those runs trained and were
    evaluated on the whole image resized to H x W whatever their ``crop_pct`` said, so it reads as ``squash`` at 1.0.
    Raises UsageError naming the field at fault.
    """
    missing = [k for k in ("input_size", "mean", "std") if k not in cfg]
    if missing:
        raise UsageError(
            f"preprocessing config lacks {', '.join(missing)}",
            "pass peftx.backbones.data_config(model) (timm's data config)",
        )
    legacy = "crop_mode" not in cfg
    out = {
        "input_size": _ints(cfg["input_size"], "input_size"),
        "interpolation": str(cfg.get("interpolation") or "bicubic"),
        "mean": _floats(cfg["mean"], "mean"),
        "std": _floats(cfg["std"], "std"),
        "crop_pct": 1.0 if legacy or cfg.get("crop_pct") is None else cfg["crop_pct"],
        "crop_mode": TRAINING["crop_mode"] if legacy else cfg["crop_mode"],
    }
    channels = out["input_size"][0] if len(out["input_size"]) == 3 else 0
    if len(out["input_size"]) != 3 or min(out["input_size"]) < 1 or channels != 3:
        raise UsageError(
            f"preprocessing input_size {out['input_size']} is not [3, height, width]",
            "RGB models only: input_size = [3, H, W]",
        )
    for key in ("mean", "std"):
        if len(out[key]) != channels:
            raise UsageError(
                f"preprocessing {key} {out[key]} has {len(out[key])} values for {channels} channels",
                "give one value per channel",
            )
    if min(out["std"]) <= 0:
        raise UsageError(f"preprocessing std {out['std']} is not positive", "every std must be > 0")
    if out["interpolation"] not in INTERPOLATIONS:
        raise UsageError(
            f"unknown interpolation {out['interpolation']!r} in the data config",
            f"use one of: {', '.join(INTERPOLATIONS)}",
        )
    if out["crop_mode"] not in CROP_MODES:
        raise UsageError(f"crop_mode {out['crop_mode']!r} is not a crop mode", f"use one of: {', '.join(CROP_MODES)}")
    crop = out["crop_pct"]
    if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not (0 < crop <= 1) or not math.isfinite(crop):
        raise UsageError(
            f"crop_pct {crop!r} is outside (0, 1]",
            "the share of the resized image the crop keeps, e.g. 1.0 (all) or 0.875",
        )
    out["crop_pct"] = float(crop)
    return out


def eval_transform(cfg: Mapping[str, Any]) -> Callable:
    """PIL RGB image -> normalised float CHW tensor: timm's evaluation transform for the contract ``cfg``."""
    from timm.data import create_transform

    c = contract(cfg)
    return create_transform(
        input_size=tuple(c["input_size"]),
        is_training=False,
        interpolation=c["interpolation"],
        mean=tuple(c["mean"]),
        std=tuple(c["std"]),
        crop_pct=c["crop_pct"],
        crop_mode=c["crop_mode"],
    )


def train_transform(cfg: Mapping[str, Any], *, hflip: bool) -> Callable:
    """The evaluation transform with a random horizontal flip before ToTensor (when ``hflip``).

    timm's own training transform (RandomResizedCrop and colour jitter) is not the paper's recipe, which trains on
    the evaluation geometry; inserting the flip into timm's eval pipeline keeps every geometric step shared.
    """
    from torchvision import transforms as T

    composed = eval_transform(cfg)
    if not hflip:
        return composed
    assert isinstance(composed, T.Compose), composed  # timm's create_transform composes its steps
    steps = list(composed.transforms)
    at = next(i for i, step in enumerate(steps) if type(step).__name__ in ("MaybeToTensor", "ToTensor"))
    return T.Compose([*steps[:at], T.RandomHorizontalFlip(), *steps[at:]])


def describe(cfg: Mapping[str, Any]) -> str:
    """One line for reports: '224x224 squash (crop_pct 1), bicubic, ImageNet mean/std'."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    c = contract(cfg)
    _, h, w = c["input_size"]
    ours, imagenet_stats = (*c["mean"], *c["std"]), (*IMAGENET_DEFAULT_MEAN, *IMAGENET_DEFAULT_STD)
    imagenet = len(ours) == len(imagenet_stats) and all(
        math.isclose(a, b, abs_tol=1e-6) for a, b in zip(ours, imagenet_stats, strict=True)
    )
    stats = (
        "ImageNet mean/std"
        if imagenet
        else f"mean {tuple(round(v, 4) for v in c['mean'])}, std {tuple(round(v, 4) for v in c['std'])}"
    )
    return f"{h}x{w} {c['crop_mode']} (crop_pct {c['crop_pct']:g}), {c['interpolation']}, {stats}"


def _ints(value: Any, key: str) -> list[int]:
    try:
        items = list(value)
    except TypeError:
        raise UsageError(f"preprocessing {key} {value!r} is not a list", "e.g. input_size = [3, 224, 224]") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise UsageError(f"preprocessing {key} {value!r} holds non-integers", "e.g. input_size = [3, 224, 224]")
    return [int(v) for v in items]


def _floats(value: Any, key: str) -> list[float]:
    try:
        items = [float(v) for v in value]
    except (TypeError, ValueError):
        raise UsageError(f"preprocessing {key} {value!r} is not a list of numbers", "one number per channel") from None
    if not all(math.isfinite(v) for v in items):
        raise UsageError(f"preprocessing {key} {value!r} holds NaN/Inf", "one finite number per channel")
    return items


# ----------------------------------------------------------------------------------------------------- decoding
#
# How a FILE becomes the 8-bit RGB image the geometry above starts from is the rule of ``image_decoding.py`` (peftx's
# loaders use it; every bundle ships that same file beside infer.py). Its name is re-exported here with the contract.

# What a mode is called in the training preamble's line about mixed image modes.
MODE_NAMES = {
    "I;16": "16-bit grayscale",
    "I;16L": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I;16N": "16-bit grayscale",
    "I": "32-bit integer",
    "F": "32-bit float",
    "P": "palette",
    "1": "1-bit",
    "L": "8-bit grayscale",
    "LA": "grayscale + alpha",
    "RGBA": "RGB + alpha",
}
