#!/usr/bin/env python3
"""Classify images with this bundle and print the top-5 classes.

Standalone: needs numpy, pillow and onnxruntime (plus tensorrt and torch for model.engine). Preprocessing (input size,
interpolation, crop_pct, mean, std) and class names come from metadata.json next to this file; they reproduce timm's
evaluation transform (resize the shorter side to size / crop_pct, centre-crop, normalise).

    python infer.py photo.jpg [more.jpg ...] [--backend auto|onnx|tensorrt] [--top 5]

``--backend auto`` runs model.engine with TensorRT when the engine is present and TensorRT + CUDA are importable, and
model.onnx with ONNX Runtime otherwise.
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


def preprocess(path: Path, cfg: dict) -> np.ndarray:
    """One image as a normalised float32 [1, 3, H, W] array, as timm's eval transform makes it."""
    _, height, width = cfg["input_size"]
    crop_pct = cfg.get("crop_pct") or 1.0
    resample = RESAMPLE[cfg.get("interpolation") or "bilinear"]
    image = Image.open(path).convert("RGB")
    if height == width and cfg.get("crop_mode", "center") == "center":
        image = _resize_shorter(image, math.floor(height / crop_pct), resample)
    else:  # non-square input or crop_mode "squash": both sides scaled independently
        image = image.resize((math.floor(width / crop_pct), math.floor(height / crop_pct)), resample)
    left = int(round((image.width - width) / 2.0))
    top = int(round((image.height - height) / 2.0))
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def _resize_shorter(image: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = image.size
    if w <= h:
        return image.resize((size, int(size * h / w)), resample)
    return image.resize((int(size * w / h), size), resample)


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, path: Path):
        import onnxruntime as ort

        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, path: Path):
        import tensorrt as trt
        import torch

        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path.name} does not load here (engines are tied to one GPU and TensorRT version)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if n != self.input_name)
        self.min_batch = self.engine.get_tensor_profile_shape(self.input_name, 0)[0][0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        n = len(batch)
        if n < self.min_batch:  # the engine's profile starts above 1: pad, then drop the padding
            batch = np.concatenate([batch] + [batch[-1:]] * (self.min_batch - n))
        x = torch.from_numpy(batch).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out[:n].cpu().numpy()


def tensorrt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pick_backend(choice: str, meta: dict):
    engine = HERE / "model.engine"
    if choice == "tensorrt" or (choice == "auto" and engine.exists() and tensorrt_usable()):
        if not engine.exists():
            sys.exit("model.engine is missing: build it on this device with ./build_engine.sh")
        return TensorRTBackend(engine)
    return OnnxBackend(HERE / meta["artifacts"]["onnx"])


def top_k(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    shifted = np.exp(logits - logits.max())
    probs = shifted / shifted.sum()
    order = np.argsort(-probs)[:k]
    return [(int(i), float(probs[i])) for i in order]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--backend", choices=("auto", "onnx", "tensorrt"), default="auto")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    meta = json.loads((HERE / "metadata.json").read_text(encoding="utf-8"))
    if meta.get("status") != "ok":
        print(f"warning: this bundle's status is {meta.get('status')!r}; see parity.json", file=sys.stderr)
    backend = pick_backend(args.backend, meta)
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
