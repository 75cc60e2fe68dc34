"""What stays approximate in DeepStream: nvinfer's whole-frame resize (no antialiasing) against infer.py's PIL resize.

A real model: the embedded DINOv2 ViT-S/14 (peftx's demo weights) at --size px, with a 10-class head fitted by
logistic regression on its features of sklearn's digits (so its probabilities mean something). Each raw file goes
through (a) the bundle's infer.py preprocessing (PIL resize with antialiasing, squash at crop_pct 1, the contract a
squash-trained bundle ships) and (b) the config applied as nvinfer applies it (tests/test_deepstream.py's emulation:
the whole frame scaled to the network size with the config's scaling-filter and no antialiasing, rounded to 8 bits,
then y = net-scale-factor * (x - offsets[c])), then the same model and softmax. Reported per group of files:
max and mean |Δprob|, top-1 agreement.

    python benchmarks/deepstream_resize.py [--size 224] [--filter bicubic]

Groups: held-out digits (8x8 PNG: upscaled, antialiasing plays no part) and crops of sklearn's two sample photos
(china.jpg, flower.jpg: 200..640 px, downscaled). Prints one table and the JSON of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--filter", default="bicubic", choices=["nearest", "bilinear", "bicubic"])
    ap.add_argument("--train-digits", type=int, default=300)
    ap.add_argument("--test-digits", type=int, default=100)
    ap.add_argument("--crops", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from sklearn.datasets import load_digits, load_sample_images
    from sklearn.linear_model import LogisticRegression
    from test_deepstream import nvinfer_input

    from peftx.backbones import DEMO_MODEL, create_backbone
    from peftx.exports.accuracy import load_infer_module
    from peftx.exports.deepstream import render_config

    started = time.perf_counter()
    infer = load_infer_module(ROOT / "exports" / "templates" / "infer.py")
    prep = {
        "input_size": [3, args.size, args.size],
        "interpolation": args.filter,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }
    work = Path(tempfile.mkdtemp())
    config, _ = render_config(prep, precision="fp32", batch=1)
    (work / "config_infer_primary.txt").write_text(config)
    model = create_backbone(DEMO_MODEL, num_classes=0, img_size=args.size).eval()

    def features(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    digits, rng = load_digits(), np.random.default_rng(0)
    order = rng.permutation(len(digits.images))
    files: dict[str, list[Path]] = {"digits (8x8, upscaled)": [], "photo crops (downscaled)": []}
    for k, i in enumerate(order[: args.train_digits + args.test_digits]):
        path = work / f"d{k:04d}.png"
        Image.fromarray(np.clip(np.rint(digits.images[i] * (255 / 16)), 0, 255).astype(np.uint8)).convert("RGB").save(
            path
        )
        if k >= args.train_digits:
            files["digits (8x8, upscaled)"].append(path)
    photos = load_sample_images().images
    for k in range(args.crops):
        photo = photos[k % 2]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(200, h + 1)), int(rng.integers(200, w + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        path = work / f"p{k:03d}.jpg"
        Image.fromarray(photo[top : top + ch, left : left + cw]).save(path, quality=92)
        files["photo crops (downscaled)"].append(path)

    def pil(paths: list[Path]) -> np.ndarray:
        return np.concatenate([infer.preprocess(p, prep) for p in paths])

    def nvinfer(paths: list[Path]) -> np.ndarray:  # the config's pixels, normalised as the graph does
        from peftx.exports.deepstream import normalise

        return np.concatenate(
            [normalise(nvinfer_input(work / "config_infer_primary.txt", p), prep["mean"], prep["std"]) for p in paths]
        )

    train = sorted(work.glob("d*.png"))[: args.train_digits]
    head = LogisticRegression(C=1.0, max_iter=2000).fit(features(pil(train)), digits.target[order[: args.train_digits]])
    rows = {}
    for group, paths in files.items():
        a, b = head.predict_proba(features(pil(paths))), head.predict_proba(features(nvinfer(paths)))
        err = np.abs(a - b)
        std = np.asarray(prep["std"], np.float32).reshape(1, 3, 1, 1)
        pixel = np.abs(pil(paths) - nvinfer(paths)) * std * 255.0  # the two inputs' difference in 8-bit levels
        rows[group] = {
            "files": len(paths),
            "max_abs_prob": float(err.max()),
            "mean_abs_prob": float(err.mean()),
            "top1_agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
            "mean_top_prob_pil": float(a.max(1).mean()),
            "mean_abs_pixel_levels": float(pixel.mean()),
            "max_abs_pixel_levels": float(pixel.max()),
        }
    held_out = digits.target[order[args.train_digits : args.train_digits + args.test_digits]]
    accuracy = float(np.mean(head.predict(features(pil(files["digits (8x8, upscaled)"]))) == held_out))
    print(f"DINOv2 ViT-S/14 at {args.size} px, {args.filter}, head accuracy on held-out digits {accuracy:.1%}")
    print(f"{'group':28s} {'files':>5s} {'max|dP|':>8s} {'mean|dP|':>9s} {'top-1 agree':>11s} {'mean|dpx|':>9s}")
    for group, r in rows.items():
        print(
            f"{group:28s} {r['files']:5d} {r['max_abs_prob']:8.4f} {r['mean_abs_prob']:9.5f} "
            f"{r['top1_agreement']:11.1%} {r['mean_abs_pixel_levels']:9.2f}"
        )
    print(
        json.dumps(
            {
                "size": args.size,
                "filter": args.filter,
                "head_accuracy": accuracy,
                "groups": rows,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
