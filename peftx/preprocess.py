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
# How a FILE becomes the 8-bit RGB image the geometry above starts from. Pillow's own ``convert("RGB")`` is not a
# rule: it clips 16-bit grayscale to white, drops alpha onto whatever colour the transparent pixels happen to hold,
# ignores the EXIF orientation of phone photos, and its CMYK formula changed between Pillow versions. The rule below
# is written out in numpy so that it gives the same bytes under the device's Pillow 7 / numpy 1.21 and under the
# training machine's Pillow, and the bundle's infer.py carries a copy of it, line for line (tests/test_preprocess.py
# holds the two equal on real files of every mode). Its name is recorded in metadata.json (``image_decoding``).

DECODE_RULE = "rgb8/1"
DECODE_DESCRIPTION = (
    "8-bit RGB: RGB, L and 1-bit as Pillow reads them; 16-bit grayscale (I;16*, and I holding 0..65535) scaled to "
    "0..255 as round(v / 257); 32-bit float (F) read as 0..1, x255 rounded (values outside 0..1 or not finite are "
    "refused); palette (P) through its palette; transparency (RGBA, LA, P or L/RGB with a transparent colour) "
    "composited over white; CMYK as 255 * (1 - C) * (1 - K) per channel (no ICC profile); then the EXIF orientation "
    "(the EXIF block of a JPEG, PNG or WebP; Pillow applies a TIFF's own tag) applied; other modes refused"
)
# Pillow's ImageOps.exif_transpose table: EXIF orientation -> Image.transpose method (FLIP_LEFT_RIGHT 0,
# FLIP_TOP_BOTTOM 1, ROTATE_90 2, ROTATE_180 3, ROTATE_270 4, TRANSPOSE 5, TRANSVERSE 6).
EXIF_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}
SIXTEEN_BIT = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}
# Every mode the rule reads; anything else (LAB, HSV, YCbCr, PA, premultiplied La / RGBa, I;32...) is refused.
DECODED_MODES = ("RGB", "L", "1", "P", "RGBA", "LA", "RGBX", "CMYK", "I", "F", *SIXTEEN_BIT)
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


class ImageModeError(ValueError):
    """A file the decoding rule refuses: ``str(exc)`` names the file and the mode, ``fix`` says what to do."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


def to_rgb(image: Any, name: str) -> Any:
    """``image`` (an opened PIL image of the file ``name``) as the 8-bit RGB image the contract starts from, by the
    rule ``DECODE_RULE``; raises ImageModeError for a file the rule refuses. The bundle's infer.py has the same
    function; keep the two identical."""
    import numpy as np
    from PIL import Image

    mode, info = image.mode, image.info
    if mode not in DECODED_MODES:
        raise unsupported_mode(name, mode)
    transparent = info.get("transparency")
    keyed = mode in ("L", "RGB") and isinstance(transparent, (int, tuple))  # one colour is transparent (tRNS)
    if mode in ("RGB", "L", "1", "RGBX") and not keyed:
        rgb = image.convert("RGB")
    elif mode in SIXTEEN_BIT or mode == "I":
        values = np.frombuffer(image.tobytes(), SIXTEEN_BIT.get(mode, "=i4")).reshape(image.height, image.width)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise ImageModeError(
                f"{name}: image mode {mode} (32-bit integer) holds values {low}..{high}, outside 0..65535",
                "save it as a 16-bit or 8-bit PNG/TIFF",
            )
        gray = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
        rgb = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    elif mode == "F":
        values = np.frombuffer(image.tobytes(), "=f4").reshape(image.height, image.width).astype(np.float64)
        finite = bool(np.isfinite(values).all())
        least, most = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not finite or least < 0.0 or most > 1.0:
            held = "NaN or infinite values" if not finite else f"values {least:g}..{most:g}"
            raise ImageModeError(
                f"{name}: image mode F (32-bit float) holds {held}; peftx reads float images as 0..1",
                "scale it to 0..1, or save it as a 16-bit or 8-bit PNG/TIFF",
            )
        gray = np.rint(values * 255.0).astype(np.uint8)
        rgb = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    elif mode == "CMYK":
        cmyk = np.asarray(image, dtype=np.uint32)
        white = 255 - cmyk[:, :, 3:4]
        rgb = Image.fromarray((((255 - cmyk[:, :, :3]) * white + 127) // 255).astype(np.uint8))
    else:  # RGBA, LA, P, and L / RGB with a transparent colour: composited over white
        if mode == "P":
            index = np.asarray(image, dtype=np.uint8)
            palette = list(image.getpalette() or [])[:768]
            ramp = [v for i in range(len(palette) // 3, 256) for v in (i, i, i)]
            colours = np.asarray(palette[: 3 * (len(palette) // 3)] + ramp, dtype=np.uint32).reshape(256, 3)
            alphas = np.full(256, 255, dtype=np.uint32)
            if isinstance(transparent, int) and 0 <= transparent < 256:
                alphas[transparent] = 0
            elif isinstance(transparent, bytes):
                alphas[: min(len(transparent), 256)] = np.frombuffer(transparent[:256], dtype=np.uint8)
            colour, alpha = colours[index], alphas[index][:, :, None]
        elif mode in ("RGBA", "LA"):
            rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
            colour, alpha = rgba[:, :, :3], rgba[:, :, 3:4]
        else:  # L or RGB with one transparent colour (a PNG tRNS chunk)
            colour = np.asarray(image.convert("RGB"), dtype=np.uint32)
            key = np.asarray(transparent if isinstance(transparent, tuple) else (transparent,) * 3, dtype=np.uint32)
            alpha = np.where((colour == key[:3]).all(axis=2, keepdims=True), 0, 255).astype(np.uint32)
        rgb = Image.fromarray(((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8))
    method = EXIF_TRANSPOSE.get(exif_orientation(image))
    return rgb if method is None else rgb.transpose(method)


def unsupported_mode(name: str, mode: str) -> ImageModeError:
    """The refusal of a mode the rule does not read (LAB, HSV, YCbCr, PA, La, RGBa, I;32, ...)."""
    return ImageModeError(f"{name}: image mode {mode} is not one peftx decodes", "save it as 8-bit RGB or grayscale")


def exif_orientation(image: Any) -> int:
    """The EXIF orientation (1..8) of an opened PIL image from the EXIF block of a JPEG, PNG or WebP (read the same
    way under every Pillow; a TIFF's orientation tag is applied by Pillow's decoder itself, Pillow 7 included);
    1 when there is none or it does not parse."""
    from PIL import Image

    try:
        raw = image.info.get("exif") or b""
        if not raw or hasattr(image, "tag_v2"):  # a TIFF: Pillow's TIFF decoder applies its orientation tag itself
            return 1
        exif = Image.Exif()
        exif.load(raw if raw.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + raw)
        value = int(exif.get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block means no orientation, on every side alike
        return 1
    return value if value in EXIF_TRANSPOSE else 1
