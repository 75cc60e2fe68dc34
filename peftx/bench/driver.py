"""The driver: runs the suites of a :class:`BenchConfig` next to a matmul peak, evaluates the targets, and writes
``bench.json`` and ``bench.png``."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .._util import jsonable
from ..fsutil import atomic_path, ensure_dir, write_text_atomic
from ..runtime import resolve_device
from .config import (
    DTYPES,
    EXPORT_SECONDS_MAX,
    MERGED_OVER_PLAIN_MAX,
    ORT_PEAK_FRACTION_MIN,
    VERDICT_MIN_ROUNDS,
    BenchConfig,
    Progress,
)
from .machine import environment, loadavg, physical_cores, torch_threads
from .peak import matmul_peak, ort_matmul_peak
from .plots import plot_results
from .suites.export import bench_export
from .suites.inference import bench_inference
from .suites.profile import bench_profile
from .suites.training import bench_training
from .timing import contention_probe


def run_benchmarks(cfg: BenchConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the suites of ``cfg``; returns a JSON-ready dict (environment, peak, suites, targets)."""
    cfg.validate()
    say = progress or (lambda _m: None)
    device = resolve_device(cfg.device)
    threads = cfg.threads or physical_cores()
    started = time.perf_counter()
    results: dict[str, Any] = {"config": _config_json(cfg), "environment": environment(threads, device)}
    with torch_threads(threads), _work_dir(cfg.work_dir) as work:
        say(f"matmul peak: {cfg.matmul_n}^3 {cfg.dtype} GEMM on {device.type}, {threads} thread(s)")
        peaks = [matmul_peak(cfg.matmul_n, reps=cfg.matmul_reps, device=device, dtype=DTYPES[cfg.dtype])]
        if cfg.onnxruntime and device.type == "cpu" and "inference" in cfg.suites:
            peaks.append(ort_matmul_peak(cfg.matmul_n, reps=cfg.matmul_reps, threads=threads))
        results["peak_start"] = peaks
        if device.type == "cpu":
            results["contention_start"] = contention_probe(threads)
        if "inference" in cfg.suites:
            results["inference"] = [
                bench_inference(cfg.spec(k), cfg, threads=threads, device=device, work_dir=work, progress=say)
                for k in cfg.models
            ]
        if "training" in cfg.suites:
            results["training"] = [
                bench_training(cfg.train_spec(k), cfg, threads=threads, device=device, progress=say)
                for k in cfg.train_models
            ]
        if "profile" in cfg.suites:
            results["profile"] = [
                bench_profile(cfg.train_spec(k), cfg, device=device, progress=say) for k in cfg.train_models
            ]
        if "export" in cfg.suites:
            results["export"] = [
                bench_export(cfg.spec(k), cfg, threads=threads, work_dir=work, progress=say) for k in cfg.export_models
            ]
        say("matmul peak again (end of run)")
        results["peak_end"] = [matmul_peak(cfg.matmul_n, reps=cfg.matmul_reps, device=device, dtype=DTYPES[cfg.dtype])]
        if device.type == "cpu":
            results["contention_end"] = contention_probe(threads)
    results["environment"]["loadavg_end"] = loadavg()
    results["wall_s"] = time.perf_counter() - started
    finalize(results)
    return results


def finalize(results: dict[str, Any]) -> dict[str, Any]:
    """Peak = best torch sgemm of the run (start/end); add % of peak to every inference row; evaluate targets."""
    torch_peaks = [
        p["gflops"]
        for p in results.get("peak_start", []) + results.get("peak_end", [])
        if p["backend"].startswith("torch")
    ]
    all_peaks = [p for p in results.get("peak_start", []) + results.get("peak_end", [])]
    peak = max(torch_peaks) if torch_peaks else None
    dtypes = sorted({p["dtype"] for p in all_peaks if p["backend"].startswith("torch")})
    results["peak"] = {
        "gflops": peak,
        "basis": f"best torch.mm {'/'.join(dtypes)} GEMM of this run (start and end)",
        "all": all_peaks,
    }
    for model in results.get("inference", []):
        for row in model["rows"]:
            row["pct_peak"] = 100.0 * row["gflops"] / peak if peak and row.get("gflops") else None
    results["targets"] = evaluate_targets(results)
    return results


def evaluate_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every target the issue sets, with the measured value and met / not met (None: not measured this run).

    ``rounds`` is how many timed rounds the verdict rests on (None for the export time, one measurement far from its
    bound); ``indicative`` is True when that is fewer than :data:`VERDICT_MIN_ROUNDS` (``--quick``): the verdict is
    shown as a hint, not as met / NOT met.
    """
    targets: list[dict[str, Any]] = []

    def add(target: str, where: str, value: str, met: bool | None, rounds: int | None) -> None:
        targets.append(
            {
                "target": target,
                "where": where,
                "value": value,
                "met": met,
                "rounds": rounds,
                "indicative": rounds is not None and rounds < VERDICT_MIN_ROUNDS,
            }
        )

    for model in results.get("inference", []):
        for r in model["ratios"]:
            if r["ratio"] == "merged/plain":
                add(
                    f"merged <= {MERGED_OVER_PLAIN_MAX}x plain latency",
                    f"{r['model']} b{r['batch']} {r['backend']}",
                    f"{r['value']:.3f}x",
                    r["met"],
                    _rounds(model, r["batch"]),
                )
        if model["model"] != "vit_b16":
            continue
        rows = {(row["batch"], row["backend"], row["variant"]): row for row in model["rows"]}
        for batch in sorted({row["batch"] for row in model["rows"]}):
            ort_rows = [
                rows[k]
                for k in ((batch, "ort", "merged"), (batch, "ort-fused", "merged"))
                if k in rows and rows[k]["valid"]
            ]
            eager = rows.get((batch, "eager", "merged"))
            if not ort_rows:
                continue
            best = min(ort_rows, key=lambda row: row["p50_ms"])
            pct = best.get("pct_peak")
            pct_min = 100 * ORT_PEAK_FRACTION_MIN
            add(
                f"ONNX Runtime FP32 ViT-B/16 >= {pct_min:.0f}% of matmul peak",
                f"b{batch} {best['backend']}",
                f"{pct:.1f}% ({best['gflops']:.0f} GFLOP/s)" if pct is not None else "n/a",
                bool(pct is not None and pct >= 100 * ORT_PEAK_FRACTION_MIN),
                _rounds(model, batch),
            )
            if eager:
                add(
                    "ONNX Runtime faster than PyTorch eager (merged ViT-B/16)",
                    f"b{batch} {best['backend']}",
                    f"{best['p50_ms']:.1f} ms vs {eager['p50_ms']:.1f} ms",
                    bool(best["p50_ms"] < eager["p50_ms"]),
                    _rounds(model, batch),
                )
    for model in results.get("training", []):
        rounds = (model.get("timing") or {}).get("rounds")
        for r in model["ratios"]:
            if not r["targeted"]:
                continue
            add(
                "step time <= full fine-tuning",
                f"{r['model']} {r['method']}",
                f"{r['step_time_vs_full']:.3f}x",
                r["step_time_met"],
                rounds,
            )
            add(
                "peak training memory below full fine-tuning",
                f"{r['model']} {r['method']}",
                f"{r['peak_memory_vs_full']:.3f}x",
                r["memory_met"],
                None,
            )  # memory is measured, not timed
    for model in results.get("export", []):
        add(
            f"merge + ONNX export < {EXPORT_SECONDS_MAX:.0f} s",
            model["model"],
            f"{model['merge_plus_export_s']:.1f} s",
            model["met"],
            None,
        )
    return targets


def _rounds(model: Mapping[str, Any], batch: Any) -> int | None:
    """Timed rounds kept for one inference batch size (keys are strings once the results went through JSON)."""
    timing = (model.get("timing") or {}).get(str(batch))
    return timing.get("rounds") if timing else None


def _config_json(cfg: BenchConfig) -> dict[str, Any]:
    d = asdict(replace(cfg, specs={}))
    d["specs"] = {k: asdict(v) for k, v in cfg.specs.items()}
    return d


@contextlib.contextmanager
def _work_dir(path: str | None) -> Iterator[Path]:
    if path is not None:
        yield ensure_dir(Path(path))
        return
    with tempfile.TemporaryDirectory(prefix="peftx-bench-") as tmp:
        yield Path(tmp)


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``bench.json`` and ``bench.png`` into ``out_dir`` (atomically); returns their paths."""
    out = ensure_dir(Path(out_dir))
    paths = {"json": write_text_atomic(out / "bench.json", json.dumps(jsonable(results), indent=2) + "\n")}
    with atomic_path(out / "bench.png") as tmp:
        if plot_results(results, tmp):
            paths["png"] = out / "bench.png"
    if "png" not in paths:
        (out / "bench.png").unlink(missing_ok=True)
    return paths
