"""Export suite: wall time of merge, ONNX export, onnxslim and parity for the merged model (and the bundle)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ...adapter import merge_and_unload
from ...backbones import data_config
from ...data import real_images
from ...exports import onnx_io
from ...exports.bundle import write_bundle
from ...exports.onnx_export import export_onnx, op_histogram
from ...exports.parity import make_input_sets
from ...exports.runners import OnnxRuntimeRunner
from ...exports.simplify import simplify_onnx
from ...tolerances import ONNX_FP32
from ..config import EXPORT_SECONDS_MAX, NUM_CLASSES, BenchConfig, ModelSpec, Progress
from .common import adapted_copy, parity_summary, torch_outputs


def bench_export(
    spec: ModelSpec, cfg: BenchConfig, *, threads: int, work_dir: Path, progress: Progress
) -> dict[str, Any]:
    """Wall time of merge (each method), ONNX export, onnxslim simplification and parity, for the merged model."""
    say = progress
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    plain = spec.build(NUM_CLASSES)
    build_s = time.perf_counter() - t0
    dcfg = data_config(plain)
    c, h, w = (int(v) for v in dcfg["input_size"])
    input_size = (c, h, w)
    out: dict[str, Any] = {"model": spec.key, "label": spec.label, "build_s": build_s, "merge_s": {}, "steps": {}}
    method = cfg.methods[0]
    for i, m in enumerate(cfg.methods):
        adapted = adapted_copy(plain, m, seed=cfg.seed + i)
        t0 = time.perf_counter()
        merged_m = merge_and_unload(adapted)
        out["merge_s"][m] = time.perf_counter() - t0
        if m == method:
            reference, merged = adapted, merged_m.eval()
    steps = {"merge": out["merge_s"][method]}
    path = work_dir / f"export-{spec.key}.onnx"
    say(f"{spec.key} export: ONNX export of the merged {method} model")
    t0 = time.perf_counter()
    export_onnx(merged, path, input_size=input_size, metadata={"benchmark": "peftx bench"})
    steps["onnx_export"] = time.perf_counter() - t0
    slim_path = work_dir / f"export-{spec.key}.slim.onnx"
    t0 = time.perf_counter()
    slim = simplify_onnx(path, slim_path)
    steps["simplify"] = time.perf_counter() - t0
    images = real_images(max(cfg.parity_images, 4), dcfg).numpy()
    inputs = make_input_sets(images, (1, len(images)), random_batch=2)
    say(f"{spec.key} export: parity of the ONNX graph against the unmerged model")
    t0 = time.perf_counter()
    expected = torch_outputs(reference, inputs, f"unmerged {method} (PyTorch)")
    candidate = slim_path if slim.applied else path
    parity = parity_summary(expected, OnnxRuntimeRunner(candidate), inputs, ONNX_FP32, f"unmerged {method} (PyTorch)")
    steps["parity"] = time.perf_counter() - t0
    out.update(
        method=method,
        steps=steps,
        total_s=sum(steps.values()),
        merge_plus_export_s=steps["merge"] + steps["onnx_export"],
        parity=parity,
        simplify=slim.to_json(),
        onnx_mb=sum(f.stat().st_size for f in onnx_io.files(path)) / 2**20,  # graph + .data past 2 GB
        nodes=sum(op_histogram(path).values()),
        target_s=EXPORT_SECONDS_MAX,
        met=bool(steps["merge"] + steps["onnx_export"] < EXPORT_SECONDS_MAX),
    )
    if cfg.export_bundle:
        say(f"{spec.key} export: the full bundle writer (export, FP16, every parity check)")
        t0 = time.perf_counter()
        report = write_bundle(
            reference,
            merged,
            work_dir / f"bundle-{spec.key}",
            input_size=input_size,
            data_config=dcfg,
            class_names=[str(i) for i in range(NUM_CLASSES)],
            provenance={"benchmark": "peftx bench"},
            images=images,
            tensorrt="auto",
            force=True,
            progress=None,
        )
        out["bundle"] = {"wall_s": time.perf_counter() - t0, "status": report.status, "timings": report.timings}
    return out
