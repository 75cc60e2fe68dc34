"""How merge-export's cost grows with the model: time and peak memory of each stage, ViT-S -> ViT-B -> ViT-L -> ViT-H.

    python benchmarks/scaling.py [--models vit_small_patch16_224,vit_base_patch16_224,vit_large_patch16_224,
                                           vit_huge_patch14_224]
                                 [--calibration 16] [--stages merge+export,fp16,int8] [--output DIR]

RANDOM weights (cost does not depend on their values), 224 px, RLRR adapted and merged. Each stage runs in a fresh
process (``multiprocessing`` spawn), so its peak RSS (``ru_maxrss`` of that process: torch, onnx and the model
included) is the stage's own:

1. ``merge+export``: build the model, adapt (RLRR), ``merge_and_unload``, ``export_onnx`` at opset 17 (the FP32
   ``model.onnx``) — the export time alone is reported as well;
2. ``fp16``: ``convert_to_fp16`` with the by-value block list fed ``--calibration`` real images (as a bundle does);
3. ``int8``: ``int8.quantize`` (minmax, Q/DQ) calibrated on ``--calibration`` real images.

The bundle's parity / accuracy checks are not included (they scale like inference). Writes scaling.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224")


def _images(n: int):
    from peftx.data import real_images

    cfg = {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    return real_images(n, cfg).numpy()


def _stage(name: str, model: str, work: str, n: int, queue) -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    out: dict[str, Any] = {}
    fp32 = Path(work) / f"{model}.onnx"
    if name == "merge+export":
        from peftx.adapter import adapt, merge_and_unload
        from peftx.backbones import create_backbone
        from peftx.exports.onnx_export import export_onnx
        from peftx.methods import make_config

        net = create_backbone(model, num_classes=10, pretrained=False)
        out["params"] = sum(p.numel() for p in net.parameters())
        adapted = adapt(net, make_config("rlrr"), base_fingerprint="benchmark")
        merged = merge_and_unload(adapted, inplace=True).eval()
        t0 = time.perf_counter()
        export_onnx(merged, fp32, input_size=(3, 224, 224), opset=17)
        out["export_s"] = time.perf_counter() - t0
        _files(out, fp32)
    elif name == "fp16":
        from peftx.exports.fp16 import convert_to_fp16

        _files(out, convert_to_fp16(fp32, Path(work) / f"{model}_fp16.onnx", calibration=_images(n)).path)
    else:
        from peftx.exports.int8 import quantize

        _files(out, quantize(fp32, Path(work) / f"{model}_int8.onnx", _images(n)).path)
    out["seconds"] = time.perf_counter() - started
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(out)


def _files(out: dict[str, Any], path: Path) -> None:
    """The ONNX file's size, graph and external data together, and whether it is split (past 2 GB: onnx_io.py)."""
    from peftx.exports import onnx_io

    files = onnx_io.files(path)
    out["onnx_mb"] = round(sum(f.stat().st_size for f in files) / 2**20, 1)
    out["external_data"] = len(files) > 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--stages", default="merge+export,fp16,int8", help="a subset, comma-separated, in order")
    parser.add_argument("--output", default="benchmarks/out")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for model in args.models.split(","):
            row: dict[str, Any] = {"model": model}
            for stage in args.stages.split(","):
                queue = ctx.Queue()
                proc = ctx.Process(target=_stage, args=(stage, model, work, args.calibration, queue))
                proc.start()
                proc.join()
                if proc.exitcode != 0:
                    row[stage] = {"error": f"exit code {proc.exitcode}"}
                    break
                row[stage] = queue.get()
            rows.append(row)
            print(json.dumps(row), flush=True)
            for f in Path(work).glob(f"{model}*"):
                f.unlink()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
