"""This CPU's fused int8 kernels vs the exact Q/DQ arithmetic (what the INT8 gate measures) vs FP32, on the real
DINOv2 ViT-S/14 demo backbone at 112 px (random 10-class head, seeded), calibrated and measured on real photo crops.

    python benchmarks/int8_kernels.py [--size 112] [--images 64]

Exported and quantized exactly as a bundle is (``export_onnx``, ``int8.quantize``); "exact" is ONNX Runtime with
graph optimisations disabled (``int8.exact_session_options``), "fused" its default session (infer.py's, bench's).
Prints max |Δ| and top-1 agreement of each pair, the INT8 bound at this scale, and what this CPU accumulates in.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    import onnxruntime as ort
    import timm
    import torch

    from peftx.data import real_images
    from peftx.demo_weights import demo_weights_path
    from peftx.exports import int8
    from peftx.exports.onnx_export import export_onnx
    from peftx.tolerances import INT8

    torch.manual_seed(0)
    size = (3, args.size, args.size)
    model = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(demo_weights_path())),
        img_size=args.size,
        num_classes=10,
        exportable=True,
    ).eval()
    cfg = {"input_size": size, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    cfg["crop_pct"] = 1.0
    calibration = real_images(args.images, cfg, seed=1).numpy()
    x = real_images(args.images, cfg, seed=2).numpy()  # other crops than calibration's
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model_int8.onnx"
        export_onnx(model, fp32_path, input_size=size, opset=17, layernorm="fused")
        int8.quantize(fp32_path, int8_path, calibration)
        default = ort.SessionOptions()
        default.log_severity_level = 3

        def run(path: Path, options) -> np.ndarray:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return np.concatenate([session.run(None, {name: x[i : i + 16]})[0] for i in range(0, len(x), 16)])

        fp32 = run(fp32_path, default).astype(np.float64)
        exact = run(int8_path, int8.exact_session_options(ort)).astype(np.float64)
        fused = run(int8_path, default).astype(np.float64)
    print(f"{args.images} real crops at {args.size} px; logit scale {np.abs(fp32).max():.3g}")
    for name, a, b in (("exact INT8 vs FP32", exact, fp32), ("fused INT8 vs exact", fused, exact)):
        agree = float((a.argmax(1) == b.argmax(1)).mean())
        print(f"{name:22s} max |Δ| {np.abs(a - b).max():.3g}  top-1 agreement {100 * agree:.1f} %")
    print(f"INT8 bound at this scale {INT8.bound(float(np.abs(exact).max())):.3g}; this CPU: {int8.cpu_int8_kernels()}")


if __name__ == "__main__":
    main()
