#!/usr/bin/env python3
"""Classify images with this bundle and print the top-5 classes.

Standalone: needs numpy, pillow and onnxruntime; for model.engine, the TensorRT Python package (8.5 or newer) and
cuda-python instead of onnxruntime (no torch). Preprocessing (input size, interpolation, crop_pct, crop_mode, mean,
std: the run's recorded contract) and class names come from metadata.json next to this file; ``preprocess_image``
reproduces timm's evaluation transform, which training and `peftx eval` used, to the bit.

    python infer.py photo.jpg [more.jpg ...] [--backend auto|onnx|tensorrt] [--precision fp32|fp16|int8] [--top 5]

``--backend auto`` runs model.engine with TensorRT when the engine is present and TensorRT + cuda-python + a GPU are
there (and, with ``--precision``, the engine was built at that precision), and ONNX Runtime otherwise.
``--precision`` picks the artifact: fp32 model.onnx, fp16 model_fp16.onnx, int8 model_int8.onnx (the Q/DQ graph of a
``--precision int8`` bundle; ONNX Runtime runs it on CPU with INT8 kernels); without it, the bundle's own precision
for ONNX, and model.engine as built.

Before an engine is loaded, model.engine.json (written wherever the engine was built) is compared with this machine:
an engine built for another GPU or TensorRT version is refused with one line instead of TensorRT's "version tag does
not match". peftx's own `validate` uses the same functions, and its accuracy check runs this file's preprocessing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


def load_image(path: Path) -> Image.Image:
    """The file as an RGB image, decoded as peftx's training data loader decodes it."""
    with Image.open(path) as image:
        return image.convert("RGB")


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
    array = np.asarray(image, dtype=np.float32) / 255.0
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
        image = ImageOps.expand(image, border=(pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2),
                                fill=fill)
        if image.size == (width, height):
            return image
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


class OnnxBackend:
    def __init__(self, path: Path, precision: str = "fp32"):
        import onnxruntime as ort

        self.name = f"onnxruntime ({path.name}, {precision})"

        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), providers=providers)
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
        raise ValueError(f"{Path(path).name} is unreadable ({exc}); rebuild the engine with ./build_engine.sh")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{Path(path).name} is not a {MANIFEST_FORMAT}; rebuild the engine with ./build_engine.sh")
    return manifest


def _release(version) -> tuple[int, ...]:
    """TensorRT '10.3.0.26' -> (10, 3, 0): engines load only under the same major.minor.patch."""
    parts = []
    for piece in str(version or "").split(".")[:3]:
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


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
        refusals.append(f"TensorRT {manifest.get('tensorrt_version')} built it, this machine has "
                        f"{here.get('tensorrt_version')}")
    m_gpu, h_gpu = manifest.get("gpu") or {}, here.get("gpu") or {}
    if not m_gpu.get("compute_capability"):
        warnings.append(f"{MANIFEST_FILE} does not say which GPU built the engine: it cannot be checked against this one")
    elif h_gpu.get("compute_capability") and m_gpu.get("compute_capability") != h_gpu.get("compute_capability"):
        refusals.append(f"it was built for compute capability {m_gpu.get('compute_capability')} "
                        f"({m_gpu.get('name')}), this GPU is {h_gpu.get('compute_capability')} ({h_gpu.get('name')})")
    elif h_gpu.get("name") and m_gpu.get("name") and m_gpu.get("name") != h_gpu.get("name"):
        warnings.append(f"model.engine was built on {m_gpu.get('name')}, this GPU is {h_gpu.get('name')} (same "
                        "compute capability: it loads, but rebuild it here for full speed)")
    m_l4t, h_l4t = (manifest.get("jetson") or {}).get("l4t"), (here.get("jetson") or {}).get("l4t")
    if m_l4t and h_l4t and m_l4t != h_l4t:
        warnings.append(f"model.engine was built on L4T {m_l4t}, this Jetson runs L4T {h_l4t}")
    digests = here.get("sha256") or {}
    engine_name = manifest.get("engine", "model.engine")
    if manifest.get("engine_sha256") and digests.get(engine_name) not in (None, manifest["engine_sha256"]):
        refusals.append(f"{engine_name} is not the engine {MANIFEST_FILE} describes (sha256 differs)")
    source = manifest.get("source_onnx")
    if source and manifest.get("source_onnx_sha256") and digests.get(source) not in (None,
                                                                                   manifest["source_onnx_sha256"]):
        refusals.append(f"it was built from another {source} (sha256 differs)")
    return refusals, warnings


def refusal_line(manifest: dict, here: dict, refusals: list[str]) -> str:
    """The one line shown when an engine is refused: what it was built for, what is here, how to fix it."""
    return (f"{manifest.get('engine', 'model.engine')} was built for {_describe(manifest)}; this machine has "
            f"{_describe(here)} ({'; '.join(refusals)}) — rebuild it here with ./build_engine.sh")


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
    """cuda-python's runtime module: ``cuda.bindings.runtime`` from 12.6 on, ``cuda.cudart`` before."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


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
    return {"tensorrt_version": str(trt.__version__),
            "gpu": {"name": name.split("\0")[0].strip(), "compute_capability": f"{props.major}.{props.minor}"},
            "jetson": jetson_facts()}


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_engine(engine: Path, facts=device_facts) -> None:
    """Refuse (exit with one line) an engine its manifest says was built for another machine; warn otherwise."""
    try:
        manifest = read_engine_manifest(engine.with_name(MANIFEST_FILE))
    except ValueError as exc:
        sys.exit(f"infer.py: {exc}")
    if manifest is None:
        print(f"warning: no {MANIFEST_FILE} beside {engine.name}: cannot check it was built on this machine",
              file=sys.stderr)
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

        self.trt, self.cudart = trt, _cudart()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            sys.exit(f"infer.py: {path.name} does not load here (engines are tied to one GPU and TensorRT version) "
                     "— rebuild it with ./build_engine.sh")
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
            return np.concatenate([self(batch[i:i + self.max_batch]) for i in range(0, n, self.max_batch)])
        if n < self.min_batch:  # the engine's profile starts above the batch: pad, then drop the padding
            batch = np.concatenate([batch] + [batch[-1:]] * (self.min_batch - n))
        trt, cudart = self.trt, self.cudart
        x = np.ascontiguousarray(batch, dtype=trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                       dtype=trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        d_in, d_out = _cuda(cudart.cudaMalloc(x.nbytes)), _cuda(cudart.cudaMalloc(out.nbytes))
        try:
            _cuda(cudart.cudaMemcpy(d_in, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            self.context.set_tensor_address(self.input_name, int(d_in))
            self.context.set_tensor_address(self.output_name, int(d_out))
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execution failed")
            _cuda(cudart.cudaStreamSynchronize(self.stream))
            _cuda(cudart.cudaMemcpy(out.ctypes.data, d_out, out.nbytes,
                                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        finally:
            cudart.cudaFree(d_in)
            cudart.cudaFree(d_out)
        return out[:n].astype(np.float32)


def tensorrt_usable() -> bool:
    """TensorRT and cuda-python importable and a CUDA device visible (no torch needed)."""
    try:
        import tensorrt  # noqa: F401

        count = _cuda(_cudart().cudaGetDeviceCount())
    except Exception:  # noqa: BLE001 - any import or driver failure means: use ONNX Runtime
        return False
    return count > 0


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
        sys.exit(f"infer.py: this bundle has no {precision} model — choose --precision "
                 f"{' or '.join(precisions(meta)) or 'fp32'}")
    built = engine_precision(engine) if engine.exists() else None
    engine_fits = precision is None or built == precision
    if choice == "tensorrt" or (choice == "auto" and engine.exists() and engine_fits and tensorrt_usable()):
        if not engine.exists():
            sys.exit("infer.py: model.engine is missing — build it on this device with ./build_engine.sh")
        if not engine_fits:
            sys.exit(f"infer.py: model.engine was built at {built or 'an unknown precision'}, not {precision} — "
                     f"rebuild it with ./build_engine.sh {precision}, or use --backend onnx")
        if not tensorrt_usable():
            sys.exit("infer.py: --backend tensorrt needs the tensorrt and cuda-python packages and a GPU — "
                     "install them (pip install cuda-python) or use --backend onnx")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--backend", choices=("auto", "onnx", "tensorrt"), default="auto")
    parser.add_argument("--precision", choices=tuple(PRECISION_ARTIFACTS), default=None,
                        help="which artifact runs [default: the bundle's precision; model.engine as built]")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    meta = json.loads((HERE / "metadata.json").read_text(encoding="utf-8"))
    if meta.get("status") != "ok":
        print(f"warning: this bundle's status is {meta.get('status')!r}; see parity.json", file=sys.stderr)
    backend = pick_backend(args.backend, meta, precision=args.precision)
    print(f"backend: {backend.name}", file=sys.stderr)
    names = meta.get("class_names") or []
    for path in args.images:
        logits = backend(preprocess(path, meta["preprocessing"]))[0]
        if len(args.images) > 1:
            print(f"# {path}")
        for rank, (index, prob) in enumerate(top_k(logits, args.top), start=1):
            label = names[index] if index < len(names) else str(index)
            print(f"{rank}\t{prob:.4f}\t{index}\t{label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
