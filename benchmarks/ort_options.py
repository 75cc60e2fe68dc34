"""ONNX Runtime session options on one merged model: which settings reach how much of the measured matmul peak.

    python benchmarks/ort_options.py [--model vit_b16] [--batch 1,32] [--budget 20] [--output DIR]

Variants, timed interleaved with PyTorch eager (the same rounds, a settle pause before each call): graph optimisation
level basic / extended / all, intra-op thread spinning on / off, and the onnxruntime.transformers optimizer's fused
graph (parity-checked against PyTorch with peftx.tolerances.ONNX_FP32). Prints a table, writes ort_options.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from peftx.backbones import data_config
from peftx.bench import (
    MODELS,
    ContentionGuard,
    count_flops,
    latency_stats,
    matmul_peak,
    model_dims,
    optimize_for_ort,
    ort_matmul_peak,
    ort_session_options,
    paired_ratio,
    physical_cores,
    timed_rounds,
)
from peftx.data import real_images
from peftx.exports.onnx_export import export_onnx
from peftx.exports.parity import compare, make_input_sets
from peftx.exports.runners import OnnxRuntimeRunner, TorchRunner
from peftx.tolerances import ONNX_FP32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_b16", choices=sorted(MODELS))
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timing per batch size")
    ap.add_argument("--min-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--output", default="bench-results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    model = spec.build(1000)
    size = tuple(data_config(model)["input_size"])
    flops = count_flops(model, size)
    peak = max(matmul_peak(reps=10)["gflops"], 1e-9)
    mlas = ort_matmul_peak(reps=10, threads=args.threads)["gflops"]
    images = real_images(4, data_config(model)).numpy()
    inputs = make_input_sets(images, (4,), random_batch=2)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, input_size=size)
        fused = Path(tmp) / "fused.onnx"
        heads, hidden = model_dims(model)
        info = optimize_for_ort(path, fused, model_type=spec.ort_model_type, num_heads=heads, hidden_size=hidden)

        def runner(onnx: Path, name: str, threads: int = args.threads, **options) -> OnnxRuntimeRunner:
            return OnnxRuntimeRunner(onnx, name=name, session_options=ort_session_options(threads, **options))

        runners = {f"level={lvl}": runner(path, lvl, level=lvl) for lvl in ("basic", "extended", "all")}
        runners["level=all, no spinning"] = runner(path, "nospin", spinning=False)
        if info["ok"]:
            runners["transformer optimizer + all"] = runner(fused, "fused")
        if args.threads > 1:
            runners["level=all, 1 thread"] = runner(path, "1thread", threads=1)
        reference = TorchRunner(model)
        valid = {k: compare(reference, r, inputs, ONNX_FP32).passed for k, r in runners.items()}
        for r in runners.values():
            r.__enter__()  # compare() closed each session: open them again, outside the timing
        rows, notes = [], []
        for batch in (int(b) for b in args.batch.split(",")):
            x = torch.randn(batch, *size)
            xn = x.numpy()
            fns = {
                "pytorch eager": lambda x=x: model(x),
                **{k: (lambda r=r, xn=xn: r.infer(xn)) for k, r in runners.items()},
            }
            guard = ContentionGuard(args.threads) if args.threads > 1 else None
            with torch.inference_mode():
                timing = timed_rounds(
                    fns, min_rounds=args.min_rounds, max_rounds=30, budget_s=args.budget, settle_s=0.05, guard=guard
                )
            times = timing.times
            notes.append(
                f"batch {batch}: {timing.rounds} rounds kept, {timing.discarded} discarded (contention)"
                + (", CONTENDED" if timing.contended else "")
            )
            for k, ts in times.items():
                st = latency_stats(ts, batch, flops)
                rows.append(
                    {
                        "batch": batch,
                        "variant": k,
                        "valid": valid.get(k, True),
                        **st,
                        "pct_peak": 100 * st["gflops"] / peak,
                        "vs_eager": paired_ratio(ts, times["pytorch eager"]),
                    }
                )
    out = {
        "model": args.model,
        "threads": args.threads,
        "torch_sgemm_gflops": peak,
        "ort_mlas_sgemm_gflops": mlas,
        "gflop_per_image": flops / 1e9,
        "optimizer": info,
        "rows": rows,
        "notes": notes,
    }
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "ort_options.json").write_text(json.dumps(out, indent=2, default=str))
    print(
        f"{args.model}: {flops / 1e9:.2f} GFLOP/img; matmul peak torch {peak:.0f} GFLOP/s, ORT MLAS {mlas:.0f} "
        f"GFLOP/s; {args.threads} threads; optimizer: {info.get('fused_ops', info.get('reason'))}"
    )
    print(
        f"{'batch':>5} {'variant':32} {'p50 ms':>9} {'p90 ms':>9} {'GFLOP/s':>8} {'% peak':>7} {'vs eager':>8}  valid"
    )
    print("; ".join(notes))
    for r in rows:
        print(
            f"{r['batch']:>5} {r['variant']:32} {r['p50_ms']:9.1f} {r['p90_ms']:9.1f} {r['gflops']:8.0f} "
            f"{r['pct_peak']:7.1f} {r['vs_eager']:8.3f}  {r['valid']}"
        )


if __name__ == "__main__":
    main()
