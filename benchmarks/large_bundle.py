"""A whole bundle of a model past 2 GB: write_bundle end to end, then the bundle's own infer.py on it.

    OMP_NUM_THREADS=1 python benchmarks/large_bundle.py [--model vit_huge_patch14_224] [--precision fp16]
                                                        [--target trt10] [--images 8] [--output DIR]

RANDOM weights (a 2.5 GB FP32 ViT-H/14 needs no download; what is measured does not depend on the values), RLRR
adapted with non-trivial factors and merged, so the bundle's checks compare two different code paths. Real images
(the registry-shipped photos, preprocessed by the model's own transform) feed parity. Then ``infer.py IMAGE`` and
``infer.py --check`` run on the written bundle in a fresh process, as on a device. Prints and writes one JSON row:
time and peak RSS of the bundle, its status, which files are split (graph + ``.data``), and the two infer.py runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_huge_patch14_224")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16"))
    parser.add_argument("--target", default="trt10")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--output", default="benchmarks/out")
    args = parser.parse_args()

    import torch

    from peftx.adapter import adapt, merge_and_unload
    from peftx.backbones import create_backbone, data_config
    from peftx.data import real_images
    from peftx.exports import onnx_io
    from peftx.exports.bundle import write_bundle
    from peftx.methods import make_config

    torch.manual_seed(0)
    model = adapt(
        create_backbone(args.model, num_classes=10, pretrained=False), make_config("rlrr"), base_fingerprint="x"
    )
    with torch.no_grad():  # non-trivial adapters: the merged model is another computation than the unmerged one
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    model.eval()
    merged = merge_and_unload(model, inplace=False).eval()
    cfg = data_config(merged)
    images = real_images(args.images, cfg)
    row: dict = {"model": args.model, "params": sum(p.numel() for p in merged.parameters())}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bundle"
        started = time.perf_counter()
        report = write_bundle(
            model,
            merged,
            out,
            input_size=tuple(cfg["input_size"]),
            data_config=cfg,
            class_names=[f"c{i}" for i in range(10)],
            provenance={"method": "rlrr", "benchmark": "large_bundle"},
            images=images,
            batch=(1, 4, 8),
            precision=args.precision,
            tensorrt="off",
            target=args.target,
            progress=lambda m: print(f"  {m}", flush=True),
        )
        row["bundle_s"] = round(time.perf_counter() - started, 1)
        row["bundle_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
        row["status"] = report.status
        row["timings"] = report.timings
        row["files"] = {p.name: [f.name for f in onnx_io.files(p)] for p in sorted(out.glob("*.onnx"))}
        row["bytes"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        photo = Path(tmp) / "photo.png"
        from peftx.data import sample_photos

        sample_photos()[0].convert("RGB").save(photo)
        for name, argv in (("infer", [str(photo)]), ("check", ["--check"])):
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, str(out / "infer.py"), *argv], capture_output=True, text=True)
            row[f"{name}_exit"] = done.returncode
            row[f"{name}_s"] = round(time.perf_counter() - t0, 1)
            row[f"{name}_tail"] = (done.stdout + done.stderr).strip().splitlines()[-6:]
    print(json.dumps(row, indent=1), flush=True)
    target = Path(args.output)
    target.mkdir(parents=True, exist_ok=True)
    (target / "large_bundle.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
