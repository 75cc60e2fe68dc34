"""INT8 (Q/DQ, model_int8.onnx) vs FP32 under ONNX Runtime CPU: latency at batch 1 and 32, calibration cost, and the
demo's accuracy drop, all from one run.

    python benchmarks/int8.py --demo-bundle RUN/bundle [--models vit_b16,swin_t] [--calibration 64] [--budget 20]

* ViT-S/14: the demo's REAL fine-tuned bundle (``peftx merge-export RUN --precision int8``: its model.onnx and
  model_int8.onnx at the demo's 56 px); its accuracy rows are the bundle's own gate (metadata.json), measured on the
  450 test images through the shipped infer.py.
* ViT-B/16 and Swin-T at 224 px with RANDOM weights (latency does not depend on the weights' values): exported and
  quantized here exactly as a bundle is (``peftx.exports.int8.quantize``), calibrated on ``--calibration`` real photo
  crops (``peftx.data.real_images``); calibration time and the calibrating process's peak RSS are measured in a fresh
  process per model.
* Timing: FP32 and INT8 sessions with the same options (``ort_session_options``: ORT_ENABLE_ALL, intra-op threads =
  ``--threads``), interleaved in rounds (``peftx.bench.timed_rounds``, random order per round, a settle pause before
  each call); the speed-up is the median over rounds of fp32/int8 measured in the same round (``paired_ratio``).

Prints a table; writes int8.json to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from peftx.bench import MODELS, latency_stats, paired_ratio, physical_cores, timed_rounds
from peftx.bench.ort import ort_session_options


def _calibrate(fp32: str, out: str, n: int, size: tuple[int, int, int], method: str, queue) -> None:
    """In a fresh process: n real images, quantize; report seconds and this process's peak RSS."""
    from peftx.data import real_images
    from peftx.exports.int8 import quantize

    cfg = {
        "input_size": size,
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    images = real_images(n, cfg).numpy()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    graph = quantize(fp32, out, images, method=method)
    queue.put(
        {
            "seconds": time.perf_counter() - started,
            "images": n,
            "method": method,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": base,
            "quantized": len(graph.quantized),
        }
    )


def _export(key: str, tmp: Path) -> tuple[Path, tuple[int, int, int]]:
    from peftx.backbones import data_config
    from peftx.exports.onnx_export import export_onnx

    model = MODELS[key].build(1000)
    size = tuple(data_config(model)["input_size"])
    path = tmp / f"{key}.onnx"
    export_onnx(model, path, input_size=size)
    return path, size


def _session(path: Path, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), ort_session_options(threads), providers=["CPUExecutionProvider"])


def _time_pair(fp32: Path, int8: Path, size, batches, threads: int, budget: float, min_rounds: int) -> dict:
    sessions = {"fp32": _session(fp32, threads), "int8": _session(int8, threads)}
    name = sessions["fp32"].get_inputs()[0].name
    out = {}
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, *size)).astype(np.float32)
        fns = {k: (lambda s=s, x=x: s.run(None, {name: x})) for k, s in sessions.items()}
        timing = timed_rounds(fns, warmup=1, min_rounds=min_rounds, budget_s=budget, settle_s=0.05)
        out[batch] = {
            "fp32": latency_stats(timing.times["fp32"], batch, None),
            "int8": latency_stats(timing.times["int8"], batch, None),
            "speedup": paired_ratio(timing.times["fp32"], timing.times["int8"]),
            **timing.to_json(),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-bundle", type=Path, help="a --precision int8 bundle of the demo run")
    ap.add_argument("--models", default="vit_b16,swin_t")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls per batch size")
    ap.add_argument("--min-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--output", type=Path, default=Path("bench-results"))
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    results: dict = {"threads": args.threads, "loadavg_start": os.getloadavg(), "models": {}}
    rows = []
    if args.demo_bundle:
        meta = json.loads((args.demo_bundle / "metadata.json").read_text())
        size = tuple(meta["preprocessing"]["input_size"])
        timing = _time_pair(
            args.demo_bundle / "model.onnx",
            args.demo_bundle / "model_int8.onnx",
            size,
            batches,
            args.threads,
            args.budget,
            args.min_rounds,
        )
        acc = meta["accuracy"]
        results["models"]["vit_s14_demo"] = {
            "label": f"ViT-S/14 demo (real fine-tuned, {size[1]} px)",
            "timing": timing,
            "int8": meta["int8"],
            "accuracy": acc,
        }
        rows.append(("vit_s14_demo", results["models"]["vit_s14_demo"]))
    with tempfile.TemporaryDirectory() as tmp:
        for key in [k for k in args.models.split(",") if k]:
            fp32, size = _export(key, Path(tmp))
            int8 = Path(tmp) / f"{key}_int8.onnx"
            queue = mp.get_context("spawn").Queue()
            child = mp.get_context("spawn").Process(
                target=_calibrate, args=(str(fp32), str(int8), args.calibration, size, args.method, queue)
            )
            child.start()
            calibration = queue.get(timeout=3600)  # the child failing leaves it empty: fail, do not hang
            child.join()
            timing = _time_pair(fp32, int8, size, batches, args.threads, args.budget, args.min_rounds)
            results["models"][key] = {
                "label": f"{MODELS[key].label}, {size[1]} px",
                "timing": timing,
                "calibration": calibration,
            }
            rows.append((key, results["models"][key]))
    results["loadavg_end"] = os.getloadavg()
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "int8.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(
        f"ONNX Runtime CPU, {args.threads} threads; load average {results['loadavg_start'][0]:.1f} -> "
        f"{results['loadavg_end'][0]:.1f}"
    )
    print(f"{'model':44} {'batch':>5} {'fp32 ms':>9} {'int8 ms':>9} {'speed-up':>8} {'rounds':>6}")
    for _key, r in rows:
        for batch, t in r["timing"].items():
            print(
                f"{r['label']:44} {batch:>5} {t['fp32']['p50_ms']:9.1f} {t['int8']['p50_ms']:9.1f} "
                f"{t['speedup']:7.2f}x {t['rounds']:>6}"
            )
        if "calibration" in r:
            c = r["calibration"]
            print(
                f"  calibration: {c['images']} images ({c['method']}) {c['seconds']:.1f} s, peak RSS "
                f"{c['peak_rss_mb']:.0f} MB (before {c['rss_before_mb']:.0f} MB), {c['quantized']} nodes quantized"
            )
        if "accuracy" in r:
            a = r["accuracy"]
            i8 = a["artifacts"]["onnxruntime int8"]
            print(
                f"  accuracy on {a['images']} test images: unmerged {100 * a['reference_accuracy']:.2f} %, INT8 "
                f"{100 * i8['accuracy']:.2f} % (drop {100 * i8['drop']:+.2f} points, top-1 agreement "
                f"{100 * i8['agreement']:.1f} %); calibration {r['int8']['calibration']['images']} images, "
                f"{r['int8']['seconds']:.1f} s"
            )


if __name__ == "__main__":
    main()
