"""How an image FILE becomes the 8-bit RGB image the preprocessing contract starts from: the rule ``DECODE_RULE``.

Pillow's own ``convert("RGB")`` is not a rule: it clips 16-bit grayscale to white, drops alpha onto whatever colour
the transparent pixels happen to hold, ignores the EXIF orientation of phone photos, and its CMYK formula changed
between Pillow versions. The rule here is written out in numpy so that it gives the same bytes under a device's
Pillow 7 / numpy 1.21 and under the training machine's Pillow. Its name and description are recorded in
metadata.json (``image_decoding``).

One file, two homes. peftx imports it (``peftx.preprocess``, the training data loader), and every bundle ships this
very file beside infer.py (``image_decoding.py``, hashed in metadata.json like the models), which infer.py imports.
So it imports nothing of peftx (numpy and Pillow only) and runs on a device's Python: CPython 3.8 with Pillow 7.0.0
and numpy 1.21 (JetPack 5) up to the newest (tests/test_device_python.py runs a bundle there). Without Pillow it
still imports (infer.py ``--check`` runs without it); decoding then needs it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

try:
    from PIL import Image
except ImportError:  # infer.py --check runs without Pillow (it names the package where an image is read)
    Image = None  # type: ignore[assignment]

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


class ImageModeError(ValueError):
    """A file the decoding rule refuses: ``str(exc)`` names the file and the mode, ``fix`` says what to do."""

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


def load_image(path: Path) -> Image.Image:
    """The file as an 8-bit RGB image by the rule (``to_rgb``)."""
    with Image.open(path) as image:
        return to_rgb(image, str(path))


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """``image`` (an opened PIL image of the file ``name``) as 8-bit RGB by the rule DECODE_RULE (see
    DECODE_DESCRIPTION); raises ImageModeError for a file the rule refuses."""
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
    # an int, not Image.Transpose (Pillow 7 has no such enum; every Pillow takes the number)
    return rgb if method is None else rgb.transpose(method)  # type: ignore[arg-type]


def unsupported_mode(name: str, mode: str) -> ImageModeError:
    """The refusal of a mode the rule does not read (LAB, HSV, YCbCr, PA, La, RGBa, I;32, ...)."""
    return ImageModeError(f"{name}: image mode {mode} is not one peftx decodes", "save it as 8-bit RGB or grayscale")


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened PIL image from the EXIF block of a JPEG, PNG or WebP (read the same
    way under every Pillow; a TIFF's orientation tag is applied by Pillow's decoder itself, Pillow 7 included);
    1 when there is none or it does not parse."""
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


def decoded_digest(image: Image.Image) -> str:
    """sha256 of the decoded RGB pixels (and their size): tells, on the device, whether its Pillow decoded a reference
    file to the same pixels as where the bundle was written (JPEG decoders differ between libjpeg releases)."""
    return hashlib.sha256(f"{image.mode} {image.size}".encode() + image.tobytes()).hexdigest()
