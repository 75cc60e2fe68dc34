"""Does JetPack 5's Pillow (7.0.0) turn the same image files into the same model inputs as the lock's Pillow?

The bundle's own infer.py (exports/templates/infer.py, with peftx/image_decoding.py beside it as a bundle ships them:
decode, resize with antialias, centre crop, normalise) runs
under the jp5 device venv (CPython 3.8, Pillow 7.0.0, numpy 1.21.6; scripts/setup-device-venvs.sh) and under this
interpreter (the lock's stack) on the same REAL files: sklearn's two photos (china.jpg, flower.jpg, 427x640 JPEG),
non-square PNG crops of them, sklearn digits (8x8, upscaled) and, when Debian's dataset-fashion-mnist is installed,
Fashion-MNIST items (28x28). For bicubic and bilinear at two input sizes it reports max |Δ| on the decoded pixels
(per file format), on the normalised tensor (PNG and JPEG apart), and on the output of the real DINOv2 ViT-S/14 (the
embedded demo weights, num_classes=0: its 384-d embedding, run here with torch on both tensor sets, so every
difference comes from the preprocessing).

    python benchmarks/pillow_resize.py [--stack jp5|new] [--output /tmp/pillow-resize]

Prints one table; writes results.json under --output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
INFER = ROOT / "exports" / "templates" / "infer.py"
DECODING = ROOT / "peftx" / "image_decoding.py"  # shipped beside infer.py, which imports it
FASHION = Path("/usr/share/datasets/fashion-mnist")
CONFIGS = [
    {"input_size": [3, s, s], "interpolation": interp, "crop_pct": 0.875, "crop_mode": "center"}
    for interp in ("bicubic", "bilinear")
    for s in (224, 112)
]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Runs under the device interpreter (-I: nothing of peftx): infer.py's own load_image + preprocess_image.
WORKER = """
import json, runpy, sys
import numpy as np, PIL
infer = runpy.run_path(sys.argv[1])
files, configs, out = json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
arrays = {}
for i, name in enumerate(files):
    image = infer["load_image"](__import__("pathlib").Path(name))
    arrays[f"pixels_{i}"] = np.asarray(image)
    for j, cfg in enumerate(configs):
        arrays[f"x_{i}_{j}"] = infer["preprocess_image"](image, cfg)
np.savez(out, **arrays)
print(PIL.__version__, np.__version__)
"""


def write_images(folder: Path) -> list[Path]:
    """The real files both stacks read: the two photos as shipped, PNG crops of them, digits, Fashion-MNIST."""
    import sklearn
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    files = list(photos)
    rng = np.random.default_rng(0)
    for k in range(8):
        with Image.open(photos[k % 2]) as photo:
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.15, 0.9)), int(h * rng.uniform(0.15, 0.9))
            left, top = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            files.append(folder / f"crop{k}_{cw}x{ch}.png")
            photo.convert("RGB").crop((left, top, left + cw, top + ch)).save(files[-1])
    digits = load_digits().images
    for k in range(4):
        files.append(folder / f"digit{k}.png")
        Image.fromarray(np.clip(np.rint(digits[k] * (255 / 16)), 0, 255).astype(np.uint8)).save(files[-1])
    if FASHION.is_dir():
        from peftx.datasets_registry import read_idx

        items = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
        for k in range(4):
            files.append(folder / f"fashion{k}.png")
            Image.fromarray(items[k]).save(files[-1])
    return files


def shipped(folder: Path) -> Path:
    """infer.py with image_decoding.py beside it, as a bundle holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DECODING, folder / DECODING.name)
    shutil.copyfile(INFER, folder / INFER.name)
    return folder / INFER.name


def preprocess_with(python: str, infer: Path, files: list[Path], out: Path) -> tuple[dict[str, np.ndarray], str]:
    configs = [dict(c, mean=MEAN, std=STD) for c in CONFIGS]
    done = subprocess.run(
        [python, "-I", "-c", WORKER, str(infer), json.dumps([str(f) for f in files]), json.dumps(configs), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    with np.load(out) as npz:
        return {k: npz[k] for k in npz.files}, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", default="jp5", choices=("jp5", "new"))
    parser.add_argument("--output", type=Path, default=Path("/tmp/pillow-resize"))
    args = parser.parse_args()
    venv = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup-device-venvs.sh"), "--path", args.stack],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not (Path(venv) / ".complete").is_file():
        sys.exit(f"no {args.stack} device venv: run scripts/setup-device-venvs.sh first")
    files = write_images(args.output / "images")
    infer = shipped(args.output / "shipped")
    device, device_versions = preprocess_with(f"{venv}/bin/python", infer, files, args.output / "device.npz")
    host, host_versions = preprocess_with(sys.executable, infer, files, args.output / "host.npz")

    import torch

    from peftx.backbones import DEMO_MODEL, create_backbone

    rows = []
    kinds = {kind: [i for i, f in enumerate(files) if f.suffix == kind] for kind in (".jpg", ".png")}
    decoded = {}  # per file format: max |Δ| of the decoded 0..255 values, and the share of values that differ
    for kind, rows_of in kinds.items():
        deltas = [np.abs(device[f"pixels_{i}"].astype(int) - host[f"pixels_{i}"].astype(int)) for i in rows_of]
        decoded[kind] = {
            "files": len(rows_of),
            "max_abs_levels": int(max(d.max() for d in deltas)),
            "share_of_values_differing": float(sum((d > 0).sum() for d in deltas) / sum(d.size for d in deltas)),
        }
    for j, cfg in enumerate(CONFIGS):
        size = cfg["input_size"][1]
        model = create_backbone(DEMO_MODEL, num_classes=0, img_size=size).eval()
        xs_d = np.stack([device[f"x_{i}_{j}"] for i in range(len(files))])
        xs_h = np.stack([host[f"x_{i}_{j}"] for i in range(len(files))])
        with torch.no_grad():
            out_d, out_h = (model(torch.from_numpy(x)).numpy() for x in (xs_d, xs_h))
        per_file = np.abs(xs_d - xs_h).reshape(len(files), -1).max(axis=1)
        rows.append(
            {
                "interpolation": cfg["interpolation"],
                "size": size,
                "images": len(files),
                "images_whose_tensor_differs": int((per_file > 0).sum()),
                "tensor_max_abs_png": float(per_file[kinds[".png"]].max()),
                "tensor_max_abs_jpg": float(per_file[kinds[".jpg"]].max()),
                "tensor_max_abs": float(np.abs(xs_d - xs_h).max()),
                "tensor_max_abs_in_255ths": float((np.abs(xs_d - xs_h) * np.asarray(STD)[:, None, None]).max() * 255),
                "output_max_abs": float(np.abs(out_d - out_h).max()),
                "output_scale": float(np.abs(out_h).max()),
            }
        )
    result = {
        "device": f"{args.stack}: Pillow/numpy {device_versions}",
        "host": f"Pillow/numpy {host_versions}",
        "files": [f.name for f in files],
        "decoded": decoded,
        "rows": rows,
        "command": " ".join(sys.argv),
    }
    (args.output / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']} vs {result['host']}; {len(files)} files")
    for kind, d in decoded.items():
        print(
            f"decoded {kind}: {d['files']} files, max |Δ| {d['max_abs_levels']} levels, "
            f"{100 * d['share_of_values_differing']:.4f} % of values differ"
        )
    print("interp    size  differ  tensor max|Δ| PNG / JPEG (JPEG x255)   ViT-S/14 output max|Δ| (scale)")
    for r in rows:
        print(
            f"{r['interpolation']:<9} {r['size']:>4}  {r['images_whose_tensor_differs']:>2}/{r['images']:<3} "
            f"{r['tensor_max_abs_png']:.3e} / {r['tensor_max_abs_jpg']:.3e} ({r['tensor_max_abs_in_255ths']:.2f})   "
            f"{r['output_max_abs']:.3e} ({r['output_scale']:.2f})"
        )


if __name__ == "__main__":
    main()
