"""Issue 10's new-user case, measured: a run trained on non-square images, `peftx eval` against the bundle's infer.py.

Builds an ImageFolder of non-square images from Debian's Fashion-MNIST (each 28x28 item in a random third of a 3:1
canvas, 84x28), trains the embedded DINOv2 ViT-S/14 on it with the CLI's own library calls, evaluates it, exports the
bundle (which measures its own accuracy gate), then runs the bundle's infer.py on the raw test files as a user would.
For contrast it also scores the pre-contract infer.py preprocessing (the shorter side resized to size / crop_pct,
centre crop, whatever the run trained on) on the same files and the same model.onnx.

    python benchmarks/preprocessing_contract.py --output /tmp/prep-contract [--crop-mode center --crop-pct 0.875]

Prints one table; writes results.json under --output.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from peftx.datasets_registry import FASHION_DIR, read_idx

PER_CLASS = {"train": 60, "val": 20, "test": 30}


def write_wide_fashion(root: Path, seed: int = 0) -> Path:
    """ROOT/{train,val,test}/<class>/<i>.png: each item in a random third of an 84x28 canvas (train from the 60k
    training set, val and test from t10k)."""
    train_x, train_y = (
        read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz"),
        read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz"),
    )
    test_x, test_y = (
        read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz"),
        read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz"),
    )
    rng = np.random.default_rng(seed)
    for c in range(10):
        pools = {
            "train": rng.permutation(np.flatnonzero(train_y == c)),
            "t10k": rng.permutation(np.flatnonzero(test_y == c)),
        }
        picks = {
            "train": (train_x, pools["train"][: PER_CLASS["train"]]),
            "val": (test_x, pools["t10k"][: PER_CLASS["val"]]),
            "test": (test_x, pools["t10k"][PER_CLASS["val"] : PER_CLASS["val"] + PER_CLASS["test"]]),
        }
        for split, (images, idx) in picks.items():
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(idx):
                canvas = np.zeros((28, 84), np.uint8)
                slot = int(rng.integers(0, 3))
                canvas[:, 28 * slot : 28 * slot + 28] = images[i]
                Image.fromarray(canvas).convert("RGB").save(folder / f"{j}.png")
    return root


def old_preprocess(path: Path, cfg: dict) -> np.ndarray:
    """The pre-contract infer.py: shorter side to size / crop_pct and a centre crop for square inputs, whatever the
    run's crop mode (training squashed the whole image)."""
    _, height, width = cfg["input_size"]
    crop_pct = cfg.get("crop_pct") or 1.0
    image = Image.open(path).convert("RGB")
    size = math.floor(height / crop_pct)
    w, h = image.size
    image = image.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), Image.Resampling.BICUBIC)
    left, top = int(round((image.width - width) / 2.0)), int(round((image.height - height) / 2.0))
    array = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
    array = (array - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=56)
    parser.add_argument("--crop-mode", default=None)
    parser.add_argument("--crop-pct", type=float, default=None)
    args = parser.parse_args()

    import onnxruntime as ort

    from peftx.deploy import merge_export
    from peftx.evaluate import evaluate
    from peftx.train import TrainConfig, train

    out = args.output
    data = out / "data"
    if not data.exists():
        write_wide_fashion(data)
    overrides = {k: v for k, v in (("crop_mode", args.crop_mode), ("crop_pct", args.crop_pct)) if v is not None}
    run = out / ("run-" + (args.crop_mode or "default"))
    started = time.perf_counter()
    summary = train(
        TrainConfig(
            data=str(data),
            epochs=args.epochs,
            img_size=args.img_size,
            output=str(run),
            data_overrides=overrides or None,
            overwrite=True,
        )
    )
    train_s = time.perf_counter() - started
    evaluated = evaluate(run, split="test")
    started = time.perf_counter()
    report = merge_export(run, tensorrt="off", force=True)
    export_s = time.perf_counter() - started
    bundle = report.out_dir
    meta = json.loads((bundle / "metadata.json").read_text())
    files = sorted(p for p in (data / "test").rglob("*.png"))
    labels = [p.parent.name for p in files]
    done = subprocess.run(
        [sys.executable, str(bundle / "infer.py"), *map(str, files), "--top", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split("\t")[3] for line in done.stdout.splitlines() if not line.startswith("# ")]
    infer_acc = float(np.mean([p == y for p, y in zip(rows, labels, strict=True)]))
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    names = meta["class_names"]
    old = [
        names[int(session.run(None, {"input": old_preprocess(p, meta["preprocessing"])})[0].argmax())] for p in files
    ]
    old_acc = float(np.mean([p == y for p, y in zip(old, labels, strict=True)]))
    accuracy = report.parity.accuracy
    results = {
        "preprocessing": meta["preprocessing"],
        "train_seconds": round(train_s, 1),
        "export_seconds": round(export_s, 1),
        "summary_test_accuracy": summary["test_accuracy"],
        "peftx_eval_accuracy": evaluated["accuracy"],
        "test_images": evaluated["n"],
        "bundle_gate": {
            r.candidate: {"accuracy": r.accuracy, "drop": r.drop, "agreement": r.agreement} for r in accuracy.results
        },
        "bundle_gate_preprocessing_max_abs": accuracy.preprocessing.max_abs,
        "infer_py_accuracy": infer_acc,
        "pre_contract_infer_py_accuracy": old_acc,
        "bundle_status": report.status,
    }
    (out / f"results-{args.crop_mode or 'default'}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"preprocessing: {meta['preprocessing']}")
    print(f"train {train_s:.0f} s, merge-export (incl. accuracy gate) {export_s:.0f} s, bundle {report.status}")
    print(f"peftx eval (test, {evaluated['n']} images)        {100 * evaluated['accuracy']:6.2f} %")
    for r in accuracy.results:
        print(
            f"gate: {r.candidate:34s} {100 * r.accuracy:6.2f} % (drop {100 * r.drop:+.2f}, agree "
            f"{100 * r.agreement:.1f} %)"
        )
    print(f"bundle infer.py on the raw test files   {100 * infer_acc:6.2f} %")
    print(f"pre-contract infer.py preprocessing     {100 * old_acc:6.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
