#!/usr/bin/env python3
"""Classify images with this bundle and print the top-5 classes.

Standalone: needs numpy, pillow and onnxruntime; for model.engine, the TensorRT Python package (8.5 or newer) and
cuda-python instead of onnxruntime (no torch). Runs on CPython 3.8 with Pillow 7.0 (JetPack 5) up to the newest
Python, Pillow and numpy 2 (README.md beside this file: what to install per JetPack). Preprocessing (input size,
interpolation, crop_pct, crop_mode, mean, std: the run's recorded contract) and class names come from metadata.json
next to this file; ``preprocess_image`` reproduces timm's evaluation transform, which training and `peftx eval` used,
to the bit.

    python infer.py photo.jpg [more.jpg ...] [--backend auto|onnx|tensorrt] [--precision fp32|fp16|int8] [--top 5]
    python infer.py DIR --json > scores.jsonl        # or --csv > scores.csv: one record per image

Output: by default ``rank<TAB>probability<TAB>index<TAB>label`` lines (``# path`` above each file's when there are
several); ``--json``: JSON Lines, one object per image {"path", "top": [{"rank", "index", "label", "probability",
"logit"}]}; ``--csv``: a header row, then one row per image: path, label_R, index_R, probability_R, logit_R for
R = 1..--top. probability is the softmax over all classes, logit the model's raw output. A reader that closes the
pipe early (``| head -1``) ends the run quietly with exit status 141 (as ``cat`` does).

Image files are decoded by the rule metadata.json's ``image_decoding`` names (``image_decoding.py`` beside this
file, the very file peftx's training side decodes with): 16-bit grayscale scaled by 1/257, alpha composited over
white, palette and CMYK by one formula, the EXIF orientation of phone photos applied; a file the rule refuses (e.g. a
float TIFF outside 0..1) stops the run with one line naming the file, its mode and the fix.

``--backend auto`` runs model.engine with TensorRT when the engine is present and TensorRT + cuda-python + a GPU are
there (and, with ``--precision``, the engine was built at that precision), and ONNX Runtime otherwise.
``--precision`` picks the artifact: fp32 model.onnx, fp16 model_fp16.onnx, int8 model_int8.onnx (the Q/DQ graph of a
``--precision int8`` bundle; ONNX Runtime runs it on CPU with INT8 kernels); without it, the bundle's own precision
for ONNX, and model.engine as built.

Before an engine is loaded, model.engine.json (written wherever the engine was built) is compared with this machine:
an engine built for another GPU or TensorRT version is refused with one line instead of TensorRT's "version tag does
not match". peftx's own `validate` uses the same functions, and its accuracy check runs this file's preprocessing.

A directory argument stands for the image files directly in it. Before an artifact is loaded its sha256 is compared
with metadata.json's record, and a modified file is refused (``--no-verify`` skips that, for a file changed on
purpose). ``python infer.py --check [--backend ...] [--precision ...]``: the bundle checks itself on this machine. It
runs every artifact present (model.engine too, once build_engine.sh built it here) on the shipped reference set
(reference_set.npz: real preprocessed images with the UNMERGED model's outputs) with the tolerances recorded in
metadata.json, re-does the preprocessing of the raw files in reference/ with this machine's PIL and numpy, and
prints pass/fail per artifact with the error figures. Exit status: 0 ok, 1 a check failed or an engine was refused,
2 bad input (a missing, truncated or refused image, a bad option), 3 the bundle is incomplete or was modified, 141
stdout was closed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

try:
    import numpy as np
except ImportError:  # one line instead of a traceback: numpy is the one package every use of this file needs
    sys.exit("infer.py: numpy is not installed — pip install numpy (JetPack 5: numpy==1.21.6, checked there)")

try:  # Pillow decodes and resizes images; `--check` runs without it (only its raw-file line is then skipped)
    from PIL import Image
except ImportError:
    Image = None  # type: ignore[assignment]  # checked where an image is read: one line says to install it

HERE = Path(__file__).resolve().parent
EXIT_FAILED, EXIT_INPUT, EXIT_BUNDLE = 1, 2, 3
# What a directory argument stands for (peftx.data's IMAGE_EXTENSIONS: the files training would read).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# metadata.json of the bundle, when main verifies what loads against it (None: imported as a module, or --no-verify).
VERIFY_AGAINST: dict | None = None
# Pillow's resampling filters: ``Image.Resampling`` (Pillow >= 9.1) or the module constants of older Pillow (JetPack 5
# is Ubuntu 20.04, whose Pillow is 7.0); both name the same integers in every version.
_FILTERS = None if Image is None else getattr(Image, "Resampling", Image)
RESAMPLE = (
    {}
    if _FILTERS is None
    else {
        name: getattr(_FILTERS, name.upper())
        for name in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
    }
)
# The oldest Pillow this file was run with (CI runs it under a JetPack 5 stack: Python 3.8, Pillow 7.0.0, numpy
# 1.21.6, onnxruntime 1.16.3, and under the newest release of each); --check names an older one.
OLDEST_PILLOW_TESTED = (7, 0, 0)


# --- how a file becomes 8-bit RGB: image_decoding.py beside this file ---------------------------------------------
# The rule metadata.json's ``image_decoding`` names (DECODE_RULE: 16-bit grayscale scaled by 1/257, alpha over white,
# one CMYK formula, the EXIF orientation applied; a mode the rule does not read refused with one line) is one file,
# peftx's own peftx/image_decoding.py: the bundle ships it beside this file, hashed in metadata.json like the models,
# and peftx's training side decodes with the same file. Loaded by its path (``python -I`` puts no script directory on
# sys.path) and run from its source (no __pycache__ in the bundle). Run from peftx's source tree (exports/templates/,
# where peftx loads this file as a module) there is none beside it, and peftx's is the same file.
DECODING_FILE = "image_decoding.py"


def _load_decoding():
    """image_decoding.py beside this file as a module (peftx's own where none is beside it and peftx is there)."""
    path = HERE / DECODING_FILE
    if not path.is_file():
        try:
            from peftx import image_decoding
        except ImportError:
            print(
                f"infer.py: {DECODING_FILE} is missing beside {HERE / 'infer.py'} — copy the whole bundle directory",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_BUNDLE) from None
        return image_decoding
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_decoding", path)
    if spec is None or spec.loader is None:
        print(f"infer.py: {DECODING_FILE} cannot be imported — copy the whole bundle directory", file=sys.stderr)
        raise SystemExit(EXIT_BUNDLE)
    module = importlib.util.module_from_spec(spec)
    written, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in the bundle
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = written
    return module


_decoding = _load_decoding()
DECODE_RULE = _decoding.DECODE_RULE
DECODED_MODES = _decoding.DECODED_MODES
ImageModeError = _decoding.ImageModeError
load_image = _decoding.load_image  # the file as an 8-bit RGB image, by the rule
to_rgb = _decoding.to_rgb
unsupported_mode = _decoding.unsupported_mode
exif_orientation = _decoding.exif_orientation
decoded_digest = _decoding.decoded_digest  # sha256 of the decoded pixels: tells a JPEG decoder's difference apart


def fail(message: str, code: int = EXIT_BUNDLE) -> NoReturn:
    """Stop with one line on stderr (no traceback) and ``code``."""
    print(f"infer.py: {message}", file=sys.stderr)
    raise SystemExit(code)


def read_metadata() -> dict:
    """metadata.json beside this file, or one line saying it is missing or unreadable."""
    path = HERE / "metadata.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"metadata.json is missing beside {path.parent / 'infer.py'} — copy the whole bundle directory")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"metadata.json is unreadable ({exc}) — copy the bundle again")


def verify_artifact(name: str, meta: dict) -> None:
    """Refuse a bundle file that is missing or whose sha256 is not the one metadata.json recorded when the bundle
    was written and checked (a flipped byte in a model runs silently otherwise)."""
    problem = artifact_problem(name, meta)
    if problem == "missing from the bundle":
        fail(f"{name} is missing from the bundle {HERE} — copy it from the original bundle")
    if problem:
        fail(
            f"{name} is {problem} — copy it again from the original bundle, or pass --no-verify if you changed "
            "it on purpose"
        )


def image_files(paths: list[Path]) -> list[Path]:
    """The files to classify: each file given, and the image files directly in each directory given."""
    files = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            found = [p for p in inside if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not found:
                fail(
                    f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}; sub-folders are not searched) — "
                    "pass image files, or a directory of them",
                    EXIT_INPUT,
                )
            if len(found) < len(inside):
                print(
                    f"warning: {path}: skipped {len(inside) - len(found)} file(s) that are not images", file=sys.stderr
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            fail(f"{path} does not exist" if not path.exists() else f"{path} is not a file", EXIT_INPUT)
    return files


def read_image(path: Path) -> Image.Image:
    """``load_image``, with a file PIL cannot decode named in one line."""
    return _decoded(path, load_image)


def verify_image(path: Path) -> None:
    """The cheap check (header, PNG checksums and the image mode; no pixel decode) that runs on every file before a
    model is loaded."""

    def verify(p: Path) -> None:
        with Image.open(p) as image:
            mode = image.mode
            image.verify()
        if mode not in DECODED_MODES:  # refused before a model is loaded (a value range is checked when decoded)
            raise unsupported_mode(str(p), mode)

    _decoded(path, verify)


def _decoded(path: Path, how):
    """``how(path)``; a file PIL cannot identify or decode ends the run with one line naming it."""
    if Image is None:
        fail("Pillow is not installed — pip install pillow (it decodes and resizes the images)", EXIT_FAILED)
    try:
        return how(path)
    except ImageModeError as exc:  # a mode the decoding rule refuses: the file, the mode and the fix
        fail(f"{exc} — {exc.fix}", EXIT_INPUT)
    except FileNotFoundError:
        fail(f"{path} does not exist", EXIT_INPUT)
    except Image.DecompressionBombError as exc:
        fail(f"{path} is too large to decode safely ({exc}) — resize it first", EXIT_INPUT)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        if type(exc).__name__ == "UnidentifiedImageError":
            fail(f"{path} is not an image PIL can identify — pass {', '.join(IMAGE_EXTENSIONS)} files", EXIT_INPUT)
        if isinstance(exc, PermissionError):
            fail(f"{path} is not readable ({exc.strerror}) — fix its permissions", EXIT_INPUT)
        fail(f"{path} is truncated or corrupt: {exc} — copy it again, or re-save it", EXIT_INPUT)


def preprocess_image(image: Image.Image, cfg: dict) -> np.ndarray:
    """One RGB image as the model's float32 [3, H, W] input: the bundle's preprocessing contract.

    The same steps, in the same order and arithmetic, as timm's evaluation transform (create_transform with
    is_training=False) that training and `peftx eval` apply, so the device sees the pixels the model was checked on:
    resize by crop_pct, then per crop_mode ``squash`` (both sides to size / crop_pct, centre crop), ``center``
    (shorter side to size / crop_pct keeping the aspect ratio, centre crop) or ``border`` (longer side to
    size / crop_pct, pad with the mean colour, centre crop); then /255 and (x - mean) / std in float32.
    """
    _, height, width = (int(v) for v in cfg["input_size"])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    mode = cfg.get("crop_mode", "center")
    resample = RESAMPLE[cfg.get("interpolation") or "bilinear"]
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if mode == "squash":
        image = _resize(image, scaled, resample)
        image = _center_crop(image, height, width, fill=(0, 0, 0))
    elif mode == "border":
        image = _resize(image, _keep_ratio_size(image, scaled, longest=1.0), resample)
        image = _center_crop(image, height, width, fill=tuple(round(255 * v) for v in cfg["mean"]))
    elif mode == "center":
        if scaled[0] == scaled[1]:
            image = _resize(image, _shorter_side_size(image, scaled[0]), resample)
        else:
            image = _resize(image, _keep_ratio_size(image, scaled, longest=0.0), resample)
        image = _center_crop(image, height, width, fill=(0, 0, 0))
    else:
        raise ValueError(f"unknown crop_mode {mode!r} in metadata.json")
    array: np.ndarray = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess(path: Path, cfg: dict) -> np.ndarray:
    """One image file as a [1, 3, H, W] batch."""
    return preprocess_image(load_image(path), cfg)[None]


def _resize(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """Resize to (height, width); an image already that size is returned as it is (as torchvision does)."""
    height, width = size
    return image if image.size == (width, height) else image.resize((width, height), resample)


def _shorter_side_size(image: Image.Image, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``size`` (torchvision's Resize(int) rounding: int() of the long side)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


def _keep_ratio_size(image: Image.Image, target: tuple[int, int], longest: float) -> tuple[int, int]:
    """timm's ResizeKeepRatio: scale by a blend of the two side ratios (longest=0: fit the shorter, 1: the longer)."""
    w, h = image.size
    ratio_h, ratio_w = h / target[0], w / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(h / ratio), round(w / ratio)


def _center_crop(image: Image.Image, height: int, width: int, fill: tuple[int, ...]) -> Image.Image:
    """torchvision's / timm's centre crop: pad (with ``fill``) a side shorter than the crop, then crop the middle."""
    from PIL import ImageOps

    if width > image.width or height > image.height:
        pad_w, pad_h = max(width - image.width, 0), max(height - image.height, 0)
        image = ImageOps.expand(image, border=(pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2), fill=fill)
        if image.size == (width, height):
            return image
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


class OnnxBackend:
    def __init__(self, path: Path, precision: str = "fp32", exact: bool = False):
        if VERIFY_AGAINST is not None:
            verify_artifact(path.name, VERIFY_AGAINST)
        elif not path.is_file():
            fail(f"{path.name} is missing from the bundle {path.parent} — copy it from the original bundle")
        try:
            import onnxruntime as ort
        except ImportError:
            fail(
                "onnxruntime is not installed — pip install onnxruntime (or onnxruntime-gpu), or run the TensorRT "
                "engine (./build_engine.sh, then --backend tensorrt)",
                EXIT_FAILED,
            )

        self.name = f"onnxruntime ({path.name}, {precision})"

        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()]
        options = None
        if exact:  # --check's INT8 line: the Q/DQ graph node by node (float GEMMs on dequantized values), which is
            # TensorRT's arithmetic on every CPU; optimised, ONNX Runtime fuses it into int8 kernels that saturate
            # 16-bit pair sums on x86 CPUs without VNNI
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


# --- engine manifest: what an engine was built for (peftx.exports imports these; keep them pure and standalone) ---

MANIFEST_FILE = "model.engine.json"
MANIFEST_FORMAT = "peftx-engine-manifest"


def read_engine_manifest(path: Path) -> dict | None:
    """The manifest next to an engine, or None when there is none (an engine built by hand)."""
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{Path(path).name} is unreadable ({exc}); rebuild the engine with ./build_engine.sh"
        ) from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{Path(path).name} is not a {MANIFEST_FORMAT}; rebuild the engine with ./build_engine.sh")
    return manifest


def _release(version) -> tuple[int, ...]:
    """TensorRT '10.3.0.26' -> (10, 3, 0): engines load only under the same major.minor.patch. A shorter version
    means patch (and minor) 0: '10.3' (as TRT_VERSION=10.3 was once written) is (10, 3, 0). () when there is none."""
    parts = []
    for piece in str(version or "").strip().split(".")[:3]:
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts + [0] * (3 - len(parts))) if parts else ()


def release_string(version) -> str | None:
    """The manifest spelling of a TensorRT version: at least major.minor.patch ('10.3' -> '10.3.0'), with any build
    number kept ('10.3.0.26'); None when ``version`` names none."""
    text = str(version or "").strip()
    release = _release(text)
    if not release:
        return None
    pieces = text.split(".")
    extra = pieces[3:] if len(pieces) > 3 and all(p.isdigit() for p in pieces[:3]) else []
    return ".".join([str(n) for n in release] + extra)


def _describe(facts: dict) -> str:
    gpu = facts.get("gpu") or {}
    where = f"{gpu.get('name') or 'an unknown GPU'} (compute capability {gpu.get('compute_capability') or '?'})"
    l4t = (facts.get("jetson") or {}).get("l4t")
    version = facts.get("tensorrt_version") or "no TensorRT"
    return f"TensorRT {version} on {where}" + (f", L4T {l4t}" if l4t else "")


def engine_problems(manifest: dict, here: dict) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for running the engine ``manifest`` describes on the machine ``here`` describes.

    ``here`` holds ``tensorrt_version``, ``gpu`` {name, compute_capability}, ``jetson`` ({model, l4t} or None) and
    optionally ``sha256`` {file name: digest} of the engine and ONNX files present. Refused: another TensorRT
    major.minor.patch or compute capability (TensorRT cannot load it), an engine file or source ONNX that is not the
    one the manifest names. Only warned: another GPU name with the same compute capability, another L4T release
    with the same TensorRT (TensorRT itself loads those, with a performance warning).
    """
    refusals, warnings = [], []
    built, have = _release(manifest.get("tensorrt_version")), _release(here.get("tensorrt_version"))
    if not have:
        refusals.append("TensorRT is not installed here")
    elif built != have:
        refusals.append(
            f"TensorRT {manifest.get('tensorrt_version')} built it, this machine has {here.get('tensorrt_version')}"
        )
    m_gpu, h_gpu = manifest.get("gpu") or {}, here.get("gpu") or {}
    if not m_gpu.get("compute_capability"):
        warnings.append(
            f"{MANIFEST_FILE} does not say which GPU built the engine: it cannot be checked against this one"
        )
    elif h_gpu.get("compute_capability") and m_gpu.get("compute_capability") != h_gpu.get("compute_capability"):
        refusals.append(
            f"it was built for compute capability {m_gpu.get('compute_capability')} "
            f"({m_gpu.get('name')}), this GPU is {h_gpu.get('compute_capability')} ({h_gpu.get('name')})"
        )
    elif h_gpu.get("name") and m_gpu.get("name") and m_gpu.get("name") != h_gpu.get("name"):
        warnings.append(
            f"model.engine was built on {m_gpu.get('name')}, this GPU is {h_gpu.get('name')} (same "
            "compute capability: it loads, but rebuild it here for full speed)"
        )
    m_l4t, h_l4t = (manifest.get("jetson") or {}).get("l4t"), (here.get("jetson") or {}).get("l4t")
    if m_l4t and h_l4t and m_l4t != h_l4t:
        warnings.append(f"model.engine was built on L4T {m_l4t}, this Jetson runs L4T {h_l4t}")
    digests = here.get("sha256") or {}
    engine_name = manifest.get("engine", "model.engine")
    if manifest.get("engine_sha256") and digests.get(engine_name) not in (None, manifest["engine_sha256"]):
        refusals.append(f"{engine_name} is not the engine {MANIFEST_FILE} describes (sha256 differs)")
    source = manifest.get("source_onnx")
    if (
        source
        and manifest.get("source_onnx_sha256")
        and digests.get(source) not in (None, manifest["source_onnx_sha256"])
    ):
        refusals.append(f"it was built from another {source} (sha256 differs)")
    return refusals, warnings


def refusal_line(manifest: dict, here: dict, refusals: list[str]) -> str:
    """The one line shown when an engine is refused: what it was built for, what is here, how to fix it."""
    return (
        f"{manifest.get('engine', 'model.engine')} was built for {_describe(manifest)}; this machine has "
        f"{_describe(here)} ({'; '.join(refusals)}) — rebuild it here with ./build_engine.sh"
    )


def parse_l4t(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, GCID: ...' (/etc/nv_tegra_release) -> '36.4.3'."""
    head = text.strip().splitlines()[0] if text.strip() else ""
    major = head.split("(")[0].strip().lstrip("#").strip().lstrip("R")
    revision = head.split("REVISION:")[1].split(",")[0].strip() if "REVISION:" in head else ""
    return f"{major}.{revision}" if major.isdigit() and revision else None


def jetson_facts(root: Path = Path("/")) -> dict | None:
    """{model, l4t} on a Jetson (from /etc/nv_tegra_release and /proc/device-tree/model), None elsewhere."""
    try:
        l4t = parse_l4t((root / "etc/nv_tegra_release").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    try:
        model = (root / "proc/device-tree/model").read_bytes().rstrip(b"\0").decode("utf-8", "replace").strip()
    except OSError:
        model = None
    return {"model": model, "l4t": l4t}


def _cudart():
    """cuda-python's runtime module: ``cuda.bindings.runtime`` from 12.6 on (the only name in 13.x, JetPack 7's),
    ``cuda.cudart`` before (11.8.x, JetPack 5's)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


# cuda-python's bindings follow the CUDA major of the device, which follows the Jetson Linux (L4T) release:
# JetPack 5 (L4T R34/R35) has CUDA 11.4, JetPack 6 (R36) CUDA 12.x, JetPack 7 (R38) CUDA 13.x.
CUDA_PYTHON_FOR_L4T = {
    "34": "cuda-python==11.8.*",
    "35": "cuda-python==11.8.*",
    "36": "cuda-python==12.*",
    "38": "cuda-python==13.*",
}


def cuda_python_spec(l4t: str | None = None) -> str:
    """What to pip install for cuda-python on this machine (``l4t``: the Jetson's L4T release, None elsewhere)."""
    spec = CUDA_PYTHON_FOR_L4T.get((l4t or "").split(".")[0])
    if spec:
        return f"pip install '{spec}'"
    return "pip install the cuda-python of your CUDA major: 'cuda-python==11.8.*' (CUDA 11), '==12.*' or '==13.*'"


def tensorrt_problem() -> str | None:
    """Why model.engine cannot run here, in a few words (what is missing and how to get it), or None."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is as missing as an absent one
        return (
            "TensorRT's Python package is not importable (JetPack: sudo apt install python3-libnvinfer, and in a "
            "venv create it with --system-site-packages)"
        )
    try:
        cudart = _cudart()
    except Exception:  # noqa: BLE001
        return f"cuda-python is not installed ({cuda_python_spec((jetson_facts() or {}).get('l4t'))})"
    try:
        count = _cuda(cudart.cudaGetDeviceCount())
    except Exception as exc:  # noqa: BLE001 - a driver or CUDA-major mismatch shows here
        return f"cuda-python cannot reach a GPU ({exc}; its major must match CUDA's: {cuda_python_spec()})"
    return None if count > 0 else "no CUDA device is visible"


def _cuda(result):
    """Unpack a cuda-python (error, *values) tuple, raising on an error code."""
    err, *values = result
    if getattr(err, "value", err) != 0:
        raise RuntimeError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


def device_facts() -> dict:
    """What this machine would run an engine with: TensorRT version, GPU 0 (via cuda-python), Jetson facts."""
    import tensorrt as trt

    cudart = _cudart()
    props = _cuda(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode("utf-8", "replace") if isinstance(props.name, bytes) else str(props.name)
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu": {"name": name.split("\0")[0].strip(), "compute_capability": f"{props.major}.{props.minor}"},
        "jetson": jetson_facts(),
    }


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_or_none(path: Path) -> dict | None:
    """The engine manifest, or None when it is absent or unreadable (the caller decides what that means)."""
    try:
        return read_engine_manifest(path)
    except ValueError:
        return None


def check_engine(engine: Path, facts=device_facts) -> None:
    """Refuse (exit with one line) an engine its manifest says was built for another machine; warn otherwise."""
    try:
        manifest = read_engine_manifest(engine.with_name(MANIFEST_FILE))
    except ValueError as exc:
        sys.exit(f"infer.py: {exc}")
    if manifest is None:
        print(
            f"warning: no {MANIFEST_FILE} beside {engine.name}: cannot check it was built on this machine",
            file=sys.stderr,
        )
        return
    here = dict(facts())
    names = {manifest.get("engine", engine.name), manifest.get("source_onnx")}
    here["sha256"] = {n: _sha256(engine.parent / n) for n in names if n and (engine.parent / n).is_file()}
    refusals, warnings = engine_problems(manifest, here)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if refusals:
        sys.exit(f"infer.py: {refusal_line(manifest, here, refusals)}")


class TensorRTBackend:
    """model.engine through the TensorRT Python API (8.5+: name-based tensor API) with cuda-python buffers."""

    name = "tensorrt"

    def __init__(self, path: Path):
        import tensorrt as trt

        source = (_manifest_or_none(path.with_name(MANIFEST_FILE)) or {}).get("source_onnx")
        if VERIFY_AGAINST is not None and source:  # an engine built from a modified ONNX is a modified artifact
            verify_artifact(source, VERIFY_AGAINST)
        self.trt, self.cudart = trt, _cudart()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            sys.exit(
                f"infer.py: {path.name} does not load here (engines are tied to one GPU and TensorRT version) "
                "— rebuild it with ./build_engine.sh"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if n != self.input_name)
        low, _, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self.stream = _cuda(self.cudart.cudaStreamCreate())

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if n > self.max_batch:
            return np.concatenate([self(batch[i : i + self.max_batch]) for i in range(0, n, self.max_batch)])
        if n < self.min_batch:  # the engine's profile starts above the batch: pad, then drop the padding
            batch = np.concatenate([batch] + [batch[-1:]] * (self.min_batch - n))
        trt, cudart = self.trt, self.cudart
        x = np.ascontiguousarray(batch, dtype=trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = np.empty(
            tuple(self.context.get_tensor_shape(self.output_name)),
            dtype=trt.nptype(self.engine.get_tensor_dtype(self.output_name)),
        )
        d_in, d_out = _cuda(cudart.cudaMalloc(x.nbytes)), _cuda(cudart.cudaMalloc(out.nbytes))
        try:
            _cuda(cudart.cudaMemcpy(d_in, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            self.context.set_tensor_address(self.input_name, int(d_in))
            self.context.set_tensor_address(self.output_name, int(d_out))
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execution failed")
            _cuda(cudart.cudaStreamSynchronize(self.stream))
            _cuda(cudart.cudaMemcpy(out.ctypes.data, d_out, out.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        finally:
            cudart.cudaFree(d_in)
            cudart.cudaFree(d_out)
        return out[:n].astype(np.float32)


def tensorrt_usable() -> bool:
    """TensorRT and cuda-python importable and a CUDA device visible (no torch needed)."""
    return tensorrt_problem() is None


# --precision -> the metadata.json "artifacts" key of the ONNX file that runs it
PRECISION_ARTIFACTS = {"fp32": "onnx", "fp16": "onnx_fp16", "int8": "onnx_int8"}


def precisions(meta: dict) -> list[str]:
    """The precisions this bundle has an ONNX file for."""
    artifacts = meta.get("artifacts") or {}
    return [p for p, key in PRECISION_ARTIFACTS.items() if artifacts.get(key) and (HERE / artifacts[key]).is_file()]


def engine_precision(engine: Path) -> str | None:
    """The precision model.engine.json says the engine was built at (None: unknown)."""
    try:
        return (read_engine_manifest(engine.with_name(MANIFEST_FILE)) or {}).get("precision")
    except ValueError:
        return None


def pick_backend(choice: str, meta: dict, facts=device_facts, precision: str | None = None):
    """The backend for ``choice`` (auto | onnx | tensorrt) running the artifact of ``precision`` (None: see above)."""
    engine = HERE / "model.engine"
    if precision is not None and precision not in precisions(meta):
        sys.exit(
            f"infer.py: this bundle has no {precision} model — choose --precision "
            f"{' or '.join(precisions(meta)) or 'fp32'}"
        )
    built = engine_precision(engine) if engine.exists() else None
    engine_fits = precision is None or built == precision
    if choice == "tensorrt" or (choice == "auto" and engine.exists() and engine_fits and tensorrt_usable()):
        if not engine.exists():
            sys.exit("infer.py: model.engine is missing — build it on this device with ./build_engine.sh")
        if not engine_fits:
            sys.exit(
                f"infer.py: model.engine was built at {built or 'an unknown precision'}, not {precision} — "
                f"rebuild it with ./build_engine.sh {precision}, or use --backend onnx"
            )
        if not tensorrt_usable():
            sys.exit(
                "infer.py: --backend tensorrt needs the tensorrt and cuda-python packages and a GPU — "
                f"{tensorrt_problem() or 'install them'}; or use --backend onnx"
            )
        check_engine(engine, facts)
        return TensorRTBackend(engine)
    chosen = precision or meta.get("precision") or "fp32"
    if chosen not in precisions(meta):  # an fp16 bundle whose FP16 file was removed: run what is there
        chosen = "fp32"
    return OnnxBackend(HERE / meta["artifacts"][PRECISION_ARTIFACTS[chosen]], chosen)


def top_k(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    shifted = np.exp(logits - logits.max())
    probs = shifted / shifted.sum()
    order = np.argsort(-probs)[:k]
    return [(int(i), float(probs[i])) for i in order]


# --- the bundle checks itself: reference_set.npz through every artifact present here ------------------------------


def artifact_problem(name: str, meta: dict, verify: bool = True) -> str | None:
    """Why ``name`` cannot be trusted ("missing", "sha256 differs from metadata.json"), or None. An ONNX graph past
    2 GB keeps its weights in a file beside it (metadata.json's ``external_data``): that file is checked with it."""
    problem = _file_problem(name, meta, verify)
    for data in (meta.get("external_data") or {}).get(name, []) if problem is None else []:
        data_problem = _file_problem(data, meta, verify)
        if data_problem is not None:
            return f"without its weights: {data} is {data_problem}"
    return problem


def _file_problem(name: str, meta: dict, verify: bool) -> str | None:
    path = HERE / name
    if not path.is_file():
        return "missing from the bundle"
    if not verify:
        return None
    expected = (meta.get("sha256") or {}).get(name)
    if expected is None:
        return "metadata.json records no sha256 for it"
    return None if _sha256(path) == expected else "modified: its sha256 differs from metadata.json"


def compare_outputs(expected: np.ndarray, actual: np.ndarray, tol: dict) -> tuple[list[str], str]:
    """(failures, figures) of ``actual`` against the unmerged model's ``expected`` under a recorded tolerance: the
    same four tests as peftx's parity (finite, max |Δ| <= atol + rel_to_max * max|ref|, top-1, worst cosine)."""
    if tuple(actual.shape) != tuple(expected.shape):
        return [f"output shape {tuple(actual.shape)} != {tuple(expected.shape)}"], ""
    ref, out = expected.astype(np.float64), actual.astype(np.float64)
    max_abs = float(np.abs(out - ref).max(initial=0.0))
    bound = float(tol["atol"]) + float(tol["rel_to_max"]) * float(np.abs(ref).max(initial=0.0))
    top1 = float((ref.argmax(axis=1) == out.argmax(axis=1)).mean())
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = float(np.nan_to_num(np.where(norms == 0, 1.0, (ref * out).sum(axis=1) / norms), nan=0.0).min())
    failures = [] if np.isfinite(out).all() else ["non-finite outputs"]
    if not max_abs <= bound:
        failures.append(f"max |Δ| {max_abs:.3g} > bound {bound:.3g}")
    if top1 < float(tol["min_top1"]):
        failures.append(f"top-1 agreement {100 * top1:.1f} % < {100 * float(tol['min_top1']):g} %")
    if cosine < float(tol["min_cosine"]):
        failures.append(f"cosine {cosine:.6f} < {tol['min_cosine']}")
    figures = (
        f"max |Δ| {max_abs:.2e} (bound {bound:.2e}), worst cosine {cosine:.6f}, "
        f"top-1 agreement {100 * top1:.1f} % ({tol['name']})"
    )
    return failures, figures


def _check_targets(meta: dict, choice: str, precision: str | None) -> tuple[list[tuple], list[str]]:
    """(what, files to verify, backend factory, tolerance key, required) per artifact to check, and notes on the
    artifacts that cannot be checked here. Every ONNX file metadata.json lists runs under ONNX Runtime; model.engine
    (built here by build_engine.sh) under TensorRT."""
    import importlib.util

    targets: list[tuple[str, list[str], Any, str | None, bool]] = []
    notes: list[str] = []
    if choice in ("auto", "onnx"):
        have_ort = importlib.util.find_spec("onnxruntime") is not None
        for prec, key in PRECISION_ARTIFACTS.items():
            name = (meta.get("artifacts") or {}).get(key)
            if not name or (precision and prec != precision):
                continue
            if not have_ort:
                notes.append(f"{name}: not checked (onnxruntime is not installed)")
                continue
            required = precision is not None or prec in ("fp32", meta.get("precision"))
            exact = prec == "int8"  # the exact Q/DQ arithmetic; the fused kernels get an advisory line
            targets.append(
                (
                    f"{prec} {name} (onnxruntime{', exact Q/DQ' if exact else ''})",
                    [name],
                    lambda name=name, prec=prec, exact=exact: OnnxBackend(HERE / name, prec, exact),
                    prec,
                    required,
                )
            )
    engine = HERE / "model.engine"
    if choice in ("auto", "tensorrt"):
        built = engine_precision(engine) if engine.exists() else None
        source = (_manifest_or_none(engine.with_name(MANIFEST_FILE)) or {}).get("source_onnx")
        if not engine.exists():
            (
                targets.append(("model.engine", [], None, None, True))
                if choice == "tensorrt"
                else notes.append("model.engine: not checked (not built here: ./build_engine.sh builds it)")
            )
        elif precision and built != precision:
            notes.append(f"model.engine: not checked (built at {built or 'an unknown precision'}, not {precision})")
        elif not tensorrt_usable():
            what = f"not checked: {tensorrt_problem() or 'needs tensorrt, cuda-python and a GPU'}"
            (
                targets.append((f"model.engine: {what}", [], None, None, True))
                if choice == "tensorrt"
                else notes.append(f"model.engine: {what}")
            )
        else:

            def make(engine=engine):
                check_engine(engine)  # another GPU / TensorRT than the engine was built for: refused, one line
                return TensorRTBackend(engine)

            targets.append(
                (
                    f"{built or 'unknown precision'} model.engine (tensorrt)",
                    [source] if source else [],
                    make,
                    f"tensorrt_{built or meta.get('precision') or 'fp32'}",
                    True,
                )
            )
    return targets, notes


def _fused_int8_line(path: Path, inputs: np.ndarray, exact: np.ndarray, tol: dict, chunk: int) -> str | None:
    """An advisory line when ONNX Runtime's fused int8 kernels (what this file runs for --precision int8) differ
    here from the exact Q/DQ arithmetic by more than the INT8 bound; None when they agree."""
    fused = OnnxBackend(path, "int8")
    actual = np.concatenate([fused(inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)])
    problems, figures = compare_outputs(exact, actual, tol)
    if not problems:
        return None
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("flags", "features")):
                flags = set(line.partition(":")[2].split())
                break
    except OSError:
        pass
    vnni = flags & {"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8", "asimddp"}
    why = (
        "this CPU has no VNNI: ONNX Runtime's int8 kernels sum u8 x s8 pairs in 16 bits, which saturates"
        if ("avx2" in flags or "avx512bw" in flags) and not vnni
        else "not 16-bit saturation (this CPU accumulates in 32 bits or is unknown)"
    )
    return (
        f"note  {path.name} with ONNX Runtime's fused int8 CPU kernels (what infer.py --precision int8 runs here) "
        f"differs from the exact Q/DQ arithmetic: {figures} — {why}; TensorRT accumulates in 32 bits "
        "(advisory: the check above is the verdict)"
    )


def _check_preprocessing(data, meta: dict, ref: dict) -> tuple[bool | None, str]:
    """The raw files in reference/ through this machine's PIL + numpy against the tensors made where the bundle was
    written: another Pillow or numpy that resizes or rounds differently shows here, not as a silent accuracy loss.

    A file this Pillow DECODES to other pixels (its sha256 of the decoded pixels, ``raw_decoded_sha256``, differs:
    JPEG decoders differ between libjpeg releases, e.g. JetPack 5's Pillow 7.0 decodes some values 1-3 levels off)
    says nothing about the preprocessing: its figure is reported, and the verdict rests on the files decoded alike."""
    names = [str(n) for n in data["raw_files"]]
    if not names:
        return None, "preprocessing: not checked (the bundle holds no raw image files)"
    if Image is None:
        return None, "preprocessing: not checked (Pillow is not installed: pip install pillow)"
    digests = [str(d) for d in data.get("raw_decoded_sha256", [])]
    alike: list[float] = []
    decoded_otherwise: dict[str, float] = {}
    for k, (name, row) in enumerate(zip(names, data["raw_index"])):
        image = read_image(HERE / name)
        x = preprocess_image(image, meta["preprocessing"])
        expected = data["inputs"][int(row)]
        delta = float(np.abs(x - expected).max()) if x.shape == expected.shape else math.inf
        if k < len(digests) and decoded_digest(image) != digests[k]:
            decoded_otherwise[name] = delta
        else:
            alike.append(delta)
    bound = float(ref["preprocessing_atol"])
    import PIL

    stack = f"Pillow {PIL.__version__} + numpy {np.__version__}"
    other = ""
    if decoded_otherwise:
        worst_other = max(decoded_otherwise.values())
        other = (
            f"{len(decoded_otherwise)} file(s) ({', '.join(sorted(decoded_otherwise))}) decode to other pixels "
            f"under this Pillow (its image decoder, not the preprocessing: max |Δ| {worst_other:.2e}; README.md)"
        )
    if not alike:
        return None, f"preprocessing: not checked with {stack}: {other}"
    worst = max(alike)
    line = f"preprocessing: {len(alike)} raw files through {stack}: max |Δ| {worst:.2e} (bound {bound:.0e})"
    return worst <= bound, line + (f"; {other}" if other else "")


def _module_version(name: str) -> str | None:
    """``name.__version__`` when the module imports here, else None (a broken install counts as missing)."""
    import importlib

    try:
        return str(getattr(importlib.import_module(name), "__version__", "unknown version"))
    except Exception:  # noqa: BLE001
        return None


def environment_lines() -> list[str]:
    """What --check ran with, and one line per thing a device can only show at run time: a Pillow older than any
    this file was tested with, or a TensorRT that is not the one model.engine.json says built the engine."""
    versions = {"numpy": np.__version__, "Pillow": _module_version("PIL") if Image is not None else None}
    versions["onnxruntime"] = _module_version("onnxruntime")
    versions["TensorRT"] = _module_version("tensorrt")
    python = ".".join(str(v) for v in sys.version_info[:3])
    lines = ["env   Python " + python + "".join(f", {k} {v or 'not installed'}" for k, v in versions.items())]
    pillow = versions["Pillow"]
    if pillow and _release(pillow) and _release(pillow) < OLDEST_PILLOW_TESTED:
        oldest = ".".join(map(str, OLDEST_PILLOW_TESTED))
        lines.append(f"warn  Pillow {pillow} is older than any this infer.py was tested with ({oldest}): upgrade it")
    built = (_manifest_or_none(HERE / MANIFEST_FILE) or {}).get("tensorrt_version")
    have = versions["TensorRT"]
    if (HERE / "model.engine").exists() and built and have and _release(built) != _release(have):
        lines.append(
            f"warn  model.engine was built with TensorRT {built}, this machine has {have}: rebuild it here "
            "with ./build_engine.sh"
        )
    return lines


def check_bundle(meta: dict, choice: str = "auto", precision: str | None = None, verify: bool = True) -> int:
    """``--check``: print PASS/FAIL per artifact and for the preprocessing; 0 when every required check passed.
    model_int8.onnx is checked on the exact Q/DQ arithmetic TensorRT performs (ONNX Runtime unoptimised), so the
    verdict is the same on every CPU; a ``note`` line says when this CPU's fused int8 kernels differ from it."""
    global VERIFY_AGAINST
    VERIFY_AGAINST = None  # each file is verified below, and a modified one is a FAIL line, not the end of the check
    ref = meta.get("reference_set")
    if not ref:
        fail("this bundle has no reference set (written by an older peftx) — re-export it with peftx merge-export")
    for name in [ref["file"], *ref.get("raw_files", [])]:
        problem = artifact_problem(name, meta, verify)
        if problem:
            fail(f"the reference set cannot be trusted: {name} is {problem} — copy the bundle again")
    problem = artifact_problem(DECODING_FILE, meta, verify)
    if problem:  # the preprocessing check decodes the raw files with it
        fail(f"the image decoding cannot be trusted: {DECODING_FILE} is {problem} — copy the bundle again")
    with np.load(HERE / ref["file"], allow_pickle=False) as npz:
        data = {key: npz[key] for key in npz.files}
    inputs, expected, labels = data["inputs"], data["reference_logits"], data["labels"]
    known = labels >= 0
    print(
        f"reference set: {len(inputs)} real images ({ref.get('source', 'unknown source')}) with the unmerged "
        f"model's outputs{'' if verify else '; sha256 NOT verified (--no-verify)'}"
    )
    for line in environment_lines():
        print(line)
    failed, checked = [], 0
    passed, line = _check_preprocessing(data, meta, ref)
    print(f"{'skip' if passed is None else 'PASS' if passed else 'FAIL'}  {line}")
    if passed is False:
        failed.append("preprocessing")
    targets, notes = _check_targets(meta, choice, precision)
    chunk = int((meta.get("batch") or {}).get("max") or len(inputs))
    for what, files, make, tol_key, required in targets:
        problems = [f"{name} is {p}" for name in files if (p := artifact_problem(name, meta, verify))]
        tol = (ref.get("tolerances") or {}).get(tol_key) if tol_key else None
        if make is None:
            problems.append("missing — build it with ./build_engine.sh" if what == "model.engine" else "")
        elif tol is None:
            problems.append(f"metadata.json records no tolerance for {tol_key}")
        figures, advisory = "", None
        if not problems and tol is not None:  # (no tolerance is a problem above)
            backend = make()
            actual = np.concatenate([backend(inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)])
            # an INT8 run is compared with the same Q/DQ graph as run where the bundle was made (its quantisation
            # was judged there, on task accuracy); bundles without those outputs compare with the unmerged model
            against = data.get("int8_logits") if tol_key in ("int8", "tensorrt_int8") else None
            problems, figures = compare_outputs(expected if against is None else against, actual, tol)
            if against is not None:
                figures += f" against {ref.get('int8_reference') or 'the INT8 graph as run where it was made'}"
            if known.any():
                accuracy = float((actual.argmax(axis=1) == labels)[known].mean())
                reference = float((expected.argmax(axis=1) == labels)[known].mean())
                figures += f"; accuracy {100 * accuracy:.1f} % (unmerged {100 * reference:.1f} %)"
            if tol_key == "int8" and files:
                advisory = _fused_int8_line(HERE / files[0], inputs, actual, tol, chunk)
        checked += 1
        verdict = "PASS" if not problems else "FAIL" if required else "fail (advisory)"
        detail = "; ".join(p for p in problems if p) + (" — " if problems and figures else "") + figures
        print(f"{verdict}  {what}: {detail}".rstrip(": "))
        if advisory:
            print(advisory)
        if problems and required:
            failed.append(what)
    for note in notes:
        print(f"skip  {note}")
    if not checked:
        engine_built = engine_precision(HERE / "model.engine")
        lacking = precision and precision not in precisions(meta) and engine_built != precision
        why = (
            f"this bundle has no {precision} artifact to run here"
            if lacking
            else "no artifact could be checked here (install onnxruntime, or tensorrt + cuda-python)"
        )
        print(f"check FAILED: {why}")
        return EXIT_FAILED
    if failed:
        print(f"check FAILED: {', '.join(failed)}")
        return EXIT_FAILED
    print(f"check passed: {checked} artifact(s) and the preprocessing agree with the unmerged model")
    return 0


def load_device_bench(meta: dict, verify: bool = True):
    """device_bench.py beside this file (sha256-verified like the models), imported as a module."""
    import importlib.util

    problem = artifact_problem("device_bench.py", meta, verify)
    if problem:
        fail(f"device_bench.py is {problem} — copy it again from the original bundle")
    spec = importlib.util.spec_from_file_location("device_bench", HERE / "device_bench.py")
    if spec is None or spec.loader is None:
        fail("device_bench.py cannot be imported — copy it again from the original bundle")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_text(out, path: Path, top: list[tuple[int, str, float, float]], many: bool) -> None:
    """The default output: ``# path`` (several files), then ``rank<TAB>probability<TAB>index<TAB>label`` lines."""
    if many:
        print(f"# {path}", file=out)
    for rank, (index, label, prob, _logit) in enumerate(top, start=1):
        print(f"{rank}\t{prob:.4f}\t{index}\t{label}", file=out)


def write_json(out, path: Path, top: list[tuple[int, str, float, float]]) -> None:
    """``--json``: JSON Lines, one object per image: {"path", "top": [{"rank", "index", "label", "probability",
    "logit"}, ...]}; probability is the softmax over all classes, logit the model's raw output."""
    record = {
        "path": str(path),
        "top": [
            {"rank": rank, "index": index, "label": label, "probability": prob, "logit": logit}
            for rank, (index, label, prob, logit) in enumerate(top, start=1)
        ],
    }
    print(json.dumps(record), file=out)


def csv_header(k: int) -> list[str]:
    """``--csv``'s columns: path, then label_R, index_R, probability_R, logit_R for R = 1..k."""
    return ["path"] + [f"{what}_{r}" for r in range(1, k + 1) for what in ("label", "index", "probability", "logit")]


def write_csv(out, path: Path, top: list[tuple[int, str, float, float]], k: int) -> None:
    """``--csv``: one row per image (``csv_header``); fewer classes than ``--top`` leave the last columns empty."""
    import csv

    row: list[Any] = [str(path)]
    for index, label, prob, logit in top:
        row += [label, index, f"{prob:.6g}", f"{logit:.6g}"]
    csv.writer(out, lineterminator="\n").writerow(row + [""] * (1 + 4 * k - len(row)))


def _quiet_closed_stdout() -> None:
    """stdout's reader went away (``| head``): point stdout at /dev/null so that the interpreter's final flush does
    not print a second BrokenPipeError."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests): nothing to flush at exit
        pass


EXIT_PIPE = 141  # 128 + SIGPIPE: what `cat`, `yes` and friends exit with when `| head` closes the pipe


def main(argv: list[str] | None = None) -> int:
    """The command line; a closed stdout (``python infer.py DIR | head -1``) ends it quietly with EXIT_PIPE."""
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_closed_stdout()
        return EXIT_PIPE


def _main(argv: list[str] | None = None) -> int:
    global VERIFY_AGAINST
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path, help="image files, or directories of them")
    parser.add_argument("--backend", choices=("auto", "onnx", "tensorrt"), default="auto")
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISION_ARTIFACTS),
        default=None,
        help="which artifact runs [default: the bundle's precision; model.engine as built]",
    )
    parser.add_argument("--top", type=int, default=5, help="classes per image [default: 5]")
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--json",
        action="store_true",
        help="JSON Lines: one object per image, {path, top: [{rank, index, label, probability, logit}]}",
    )
    output.add_argument(
        "--csv",
        action="store_true",
        help="CSV with a header row, one row per image: path, then label_R, index_R, probability_R, logit_R",
    )
    parser.add_argument(
        "--check", action="store_true", help="run every artifact here on the shipped reference set and print pass/fail"
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="run artifacts whose sha256 differs from metadata.json (files changed on purpose)",
    )
    parser.add_argument(
        "--bench", action="store_true", help="time every artifact here (device_bench.py); with --check, recommend one"
    )
    parser.add_argument("--batch", default=None, help="--bench batch sizes, e.g. 1,8 [default: 1 and the opt batch]")
    parser.add_argument("--duration", type=float, default=None, help="--bench seconds per artifact [default: 3]")
    args = parser.parse_args(argv)
    if (args.check or args.bench) == bool(args.images):
        parser.error("give image files or directories to classify, or --check / --bench (not both)")
    if args.top < 1:
        parser.error(f"--top {args.top}: must be at least 1")
    meta = read_metadata()
    if args.no_verify:
        print("warning: --no-verify: the artifacts' sha256 are not checked against metadata.json", file=sys.stderr)
    VERIFY_AGAINST = None if args.no_verify else meta
    if args.bench:  # device_bench.py: timings + device_report.json (with --check: verdicts and a recommendation)
        return load_device_bench(meta, verify=not args.no_verify).run(sys.modules[__name__], meta, args)
    if args.check:
        return check_bundle(meta, args.backend, args.precision, verify=not args.no_verify)
    files = image_files(args.images)  # every path is checked before a model is loaded
    for path in files:
        verify_image(path)
    if VERIFY_AGAINST is not None:  # the decoding rule, like a model: a modified or missing copy is refused
        verify_artifact(DECODING_FILE, meta)
    if meta.get("status") != "ok":
        print(f"warning: this bundle's status is {meta.get('status')!r}; see parity.json", file=sys.stderr)
    backend = pick_backend(args.backend, meta, precision=args.precision)
    print(f"backend: {backend.name}", file=sys.stderr)
    names = meta.get("class_names") or []
    out = sys.stdout
    if args.csv:
        import csv

        csv.writer(out, lineterminator="\n").writerow(csv_header(args.top))
    for path in files:
        logits = backend(preprocess_image(read_image(path), meta["preprocessing"])[None])[0]
        top = [
            (index, names[index] if index < len(names) else str(index), prob, float(logits[index]))
            for index, prob in top_k(logits, args.top)
        ]
        if args.json:
            write_json(out, path, top)
        elif args.csv:
            write_csv(out, path, top, args.top)
        else:
            write_text(out, path, top, len(files) > 1)
        out.flush()  # a record as soon as it is made (a long folder streams; `| head -1` stops it early)
    return 0


if __name__ == "__main__":
    sys.exit(main())
