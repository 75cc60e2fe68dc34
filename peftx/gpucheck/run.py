"""The driver: resolve weights and paths, run the steps in order, rewrite the JSON after each one."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from peftx.fsutil import ensure_dir

from .assets import default_asset, load_demo_copy, write_tiny_weights
from .bench_check import BENCH_SUITES, run_bench_check
from .config import BENCH_DIR, JUNIT_FILE, LOG_FILE, GpuCheckConfig
from .parity_check import run_parity_check
from .report import Context, Weights, environment, error_text, open_log, write_json
from .tests_check import run_tests_check
from .train_check import run_train_check

STEP_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "tests": run_tests_check,
    "train": run_train_check,
    "parity": run_parity_check,
    "bench": run_bench_check,
}

# What each figure depends on, for whoever reads the JSON (issue 13: "say which figures need real weights").
NEEDS_REAL_WEIGHTS = {
    "train: test accuracy and its distance to the CPU run": "yes: with random weights the demo learns far less "
    "and the comparison is only indicative",
    "parity: vit_s14 under bf16 / fp16 autocast": "yes: DINOv2's real activation scales (LayerScale, large tokens) "
    "are what half precision must survive",
    "parity: vit_b16, swin_t, and every FP32 comparison": "no: merging is exact algebra whatever the values",
    "train: losses fall, finite, img/s, peak memory": "no",
    "bench: step time, peak memory, images/s, % of matmul peak": "no: ViT-B/16 random init (speed does not depend "
    "on the values)",
    "tests (pytest -m gpu)": "no: tiny random models",
}


@contextlib.contextmanager
def _work_dir(path: str | None) -> Iterator[Path]:
    if path is not None:
        yield ensure_dir(Path(path))
        return
    with tempfile.TemporaryDirectory(prefix="peftx-gpu-check-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def _quick_threads(quick: bool) -> Iterator[None]:
    """--quick: one torch thread. Tiny models gain nothing from a second one, and on a shared CI machine an OpenMP
    thread spin-waiting for a descheduled partner costs more than the whole computation."""
    before = torch.get_num_threads()
    if quick:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_weights(cfg: GpuCheckConfig, work: Path) -> Weights:
    """--quick: a random tiny ViT; else the carried fp16 demo copy (upcast), or random init when there is none."""
    if cfg.quick:
        return Weights(*write_tiny_weights(work))
    asset = Path(cfg.weights) if cfg.weights else default_asset()
    if cfg.weights or asset.is_file():
        return Weights(*load_demo_copy(asset, work))
    return Weights(
        None,
        {
            "kind": "random",
            "what": f"random init (no {asset}: accuracy figures are indicative)",
            "sha256": "random-init:vit_small_patch14_dinov2:seed42",
        },
    )


def run_gpu_check(cfg: GpuCheckConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the steps of ``cfg``; returns the results (also in OUT/gpu-check.json, rewritten after every step).

    A step that fails or raises is recorded and the next one still runs: one unattended run reports everything.
    """
    cfg.validate()
    device = cfg.resolved_device()
    with _work_dir(cfg.work_dir) as work, _quick_threads(cfg.quick):
        weights = resolve_weights(cfg, work)  # a bad --weights file fails here, before anything is written
        return _run_steps(cfg, device, work, weights, progress)


def _run_steps(
    cfg: GpuCheckConfig, device: str, work: Path, weights: Weights, progress: Callable[[str], None] | None
) -> dict[str, Any]:
    out = ensure_dir(cfg.resolved_out())
    log_path = open_log(out)
    results: dict[str, Any] = {
        "kind": "peftx gpu-check",
        "schema": 1,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": {"device": device, "quick": cfg.quick, "steps": list(cfg.steps), "time_limit_s": cfg.time_limit_s},
        "methods": list(cfg.resolved_methods()),
        "environment": environment(device),
        "files": {
            "json": "gpu-check.json",
            "log": LOG_FILE,
            "junit": JUNIT_FILE,
            **{f"bench_{s}": f"{BENCH_DIR}/{s}/bench.json" for s in BENCH_SUITES},
        },
        "needs_real_weights": NEEDS_REAL_WEIGHTS,
        "weights": weights.info,
        "steps": {},
    }
    ctx = Context(cfg, device, out, work, weights, log_path, progress)
    ctx.say(f"gpu check: device {device}{' (quick)' if cfg.quick else ''}, out {out}, weights: {weights.info['what']}")
    write_json(out, results)
    for step in cfg.steps:
        t0 = time.perf_counter()
        if ctx.out_of_time():
            outcome: dict[str, Any] = {"status": "not run", "checks": [ctx.not_run(f"{step}/ran")]}
            outcome["seconds"] = 0.0
            results["steps"][step] = outcome
            ctx.say(f"{step}: not run (time limit)")
            continue
        try:
            outcome = STEP_FUNCTIONS[step](ctx)
        except Exception as exc:  # noqa: BLE001 - recorded; the next step still runs
            outcome = {
                "status": "error",
                "error": error_text(exc),
                "checks": [{"name": f"{step}/ran", "ok": False, "detail": error_text(exc)}],
            }
        outcome["seconds"] = time.perf_counter() - t0
        results["steps"][step] = outcome
        ctx.say(f"{step}: {outcome['status']} ({outcome['seconds']:.0f} s)")
        write_json(out, results)
    finish(results, time.perf_counter() - ctx.started)
    ctx.say(f"gpu check: {results['status']} — {results['summary']}")
    write_json(out, results)
    return results


def finish(results: dict[str, Any], wall_s: float) -> None:
    """Overall status from every check (None = did not apply here), and a one-line summary."""
    checks = [c for s in results["steps"].values() for c in s.get("checks", [])]
    failed = [c["name"] for c in checks if c["ok"] is False]
    results["failed_checks"] = failed
    results["status"] = "failed" if failed else "ok"
    results["wall_s"] = wall_s
    n_ok = sum(c["ok"] is True for c in checks)
    n_na = sum(c["ok"] is None for c in checks)
    results["summary"] = f"{n_ok} checks passed, {len(failed)} failed, {n_na} not applicable here, {wall_s:.0f} s"
