"""Step 4: ``peftx bench`` on the device, on a short budget, and the figures the issue asks for read from its JSON.

On CUDA: inference of ViT-B/16 (random init: speed does not depend on the values) at batch 1 and 256 in bf16,
eager and ``torch.compile`` (inductor), plain vs merged vs every unmerged method, against the bf16 matmul peak
measured in the same run; training steps of ViT-B/16 at 224 px, batch 64, bf16 autocast, each method vs full
fine-tuning (step time, and peak memory from ``torch.cuda.max_memory_allocated`` in one process per method).
ONNX Runtime is left out (the GPU machine has its CPU build only) and so is TensorRT (not installed there).
The two suites run as two ``peftx bench`` processes (``bench/inference/``, ``bench/training/``), so a run that the
time limit cuts short during training still returns the inference figures, with the peak measured in their run.
``--quick`` on the CPU runs the same command on a tiny random ViT, with the ``eager`` compile backend (dynamo
tracing without inductor's minutes of C++ / Triton compilation).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from peftx.methods import get_method

from .config import BENCH_DIR
from .report import Context, check, run_logged

BENCH_SUITES = ("inference", "training")
FULL = "full"  # the training baseline every ratio is taken against (a registered method)
FROZEN = "frozen"  # the bench's backbone-only reference (not a method): the floor of back-propagating the backbone


def bench_methods(methods: tuple[str, ...], quick: bool) -> tuple[list[str], list[str]]:
    """(inference methods, training methods) for the bench, from the registry's methods being checked.

    Inference times the methods that wrap layers (the registry's ``wraps_layers``: an unmerged form that differs from
    the plain model); the head-only and full baselines merge to the plain model, so they add no row. Training times
    full fine-tuning first (the baseline), the frozen-backbone reference, then every other method. ``quick``: full
    and one adapter (each training method costs a fresh process for its peak memory).
    """
    adapters = [m for m in methods if get_method(m).wraps_layers]
    others = [m for m in methods if m != FULL]
    if quick:
        return adapters[:1] or list(methods[:1]), [FULL, *(adapters or others)[:1]]
    return adapters or list(methods), [FULL, FROZEN, *others]


def bench_command(ctx: Context, suite: str) -> list[str]:
    """The ``peftx bench`` command line of one suite (inference or training) for this run."""
    inference, training = bench_methods(ctx.cfg.resolved_methods(), ctx.cfg.quick)
    common = [
        "--quick",
        "--suite",
        suite,
        "--methods",
        ",".join(inference),
        "--train-methods",
        ",".join(training),
        "--no-onnxruntime",
        "--tensorrt",
        "off",
        "--output",
        str(ctx.out / BENCH_DIR / suite),
    ]
    if ctx.cfg.quick:
        sizes = [
            "--device",
            ctx.device,
            "--models",
            "tiny",
            "--batch",
            "1,4",
            "--dtype",
            "bf16",
            "--compile",
            "eager",
            "--train-models",
            "tiny",
            "--train-batch",
            "8",
            "--train-amp",
            "bf16",
            "--matmul-n",
            "256",
            "--budget",
            "0.3",
            "--min-rounds",
            "2",
            "--threads",
            "1",
        ]
    else:
        sizes = [
            "--device",
            ctx.device,
            "--models",
            "vit_b16",
            "--batch",
            "1,256",
            "--dtype",
            "bf16",
            "--compile",
            "inductor",
            "--train-models",
            "vit_b16",
            "--train-img-size",
            "224",
            "--train-batch",
            "64",
            "--train-amp",
            "bf16",
            "--matmul-n",
            "8192",
            "--budget",
            "3",
            "--min-rounds",
            "5",
        ]
    return [sys.executable, "-m", "peftx.cli.app", "bench", *sizes, *common]


def headline(bench: dict[str, Any]) -> dict[str, Any]:
    """The issue's figures: images/s and % of the matmul peak per (batch, backend, variant); merged/plain and
    compiled/eager ratios; training step time and peak memory vs full fine-tuning; the bench's own targets."""
    out: dict[str, Any] = {
        "peak": bench.get("peak", {}),
        "inference": {},
        "training": {},
        "targets": bench.get("targets", []),
    }
    for model in bench.get("inference", []):
        rows = {
            f"b{r['batch']} {r['backend']}:{r['variant']}": {
                "images_per_s": r["images_per_s"],
                "p50_ms": r["p50_ms"],
                "pct_peak": r.get("pct_peak"),
                "valid": r["valid"],
            }
            for r in model["rows"]
        }
        ratios = {f"b{r['batch']} {r['backend']} {r['ratio']}": r["value"] for r in model["ratios"]}
        out["inference"][model["model"]] = {
            "dtype": model.get("dtype"),
            "gflop_per_image": model["gflop_per_image"],
            "rows": rows,
            "ratios": ratios,
            "notes": model.get("notes", []),
        }
    for model in bench.get("training", []):
        out["training"][model["model"]] = {
            "settings": model.get("settings"),
            "batch": model["batch"],
            "img_size": model["img_size"],
            "rows": {
                r["method"]: {
                    "step_ms_p50": r["step_ms_p50"],
                    "peak_delta_mib": r["peak_delta_bytes"] / 2**20,
                    "trainable_params": r["trainable_params"],
                }
                for r in model["rows"]
            },
            "vs_full": {
                r["method"]: {"step_time": r["step_time_vs_full"], "peak_memory": r["peak_memory_vs_full"]}
                for r in model["ratios"]
            },
        }
    return out


def run_bench_check(ctx: Context) -> dict[str, Any]:
    if ctx.device == "cpu" and not ctx.cfg.quick:  # ViT-B/16 at batch 256 with inductor: hours on a CPU
        return {
            "status": "skipped",
            "reason": "the full-size bench is for the GPU; on a CPU run `peftx bench`",
            "checks": [check("bench/ran", None, "full-size bench on a CPU: not run")],
        }
    result: dict[str, Any] = {"runs": {}, "checks": []}
    merged: dict[str, Any] = {}
    for suite in BENCH_SUITES:  # one process each: a run cut short by the time limit keeps the suites before it
        if ctx.out_of_time():
            result["checks"].append(ctx.not_run(f"bench/{suite}/ran"))
            continue
        bench, run = _run_suite(ctx, suite)
        result["runs"][suite] = run
        result["checks"] += run.pop("checks")
        if bench is not None:
            merged[suite] = bench.get(suite, [])
            merged.setdefault("peak", bench.get("peak", {}))  # the inference run's: the base of its % of peak
            merged["targets"] = merged.get("targets", []) + bench.get("targets", [])
            if suite == "inference":
                rows = [r for m in bench.get("inference", []) for r in m["rows"]]
                bad = [f"b{r['batch']} {r['backend']}:{r['variant']}" for r in rows if not r["valid"]]
                result["checks"].append(
                    check(
                        "bench/inference/timed variants compute the right outputs",
                        not bad and bool(rows),
                        f"{len(rows)} rows" + (f"; invalid: {', '.join(bad)}" if bad else ""),
                    )
                )
                result["checks"].append(_compiled_check(bench))
    result["headline"] = headline(merged)
    result["status"] = "ok" if all(c["ok"] is not False for c in result["checks"]) else "failed"
    return result


def _compiled_check(bench: dict[str, Any]) -> dict[str, Any]:
    """Every torch.compile'd variant was built and matches its eager output (a failed compile is not timed, so the
    row check above cannot see it)."""
    entries = {k: v for m in bench.get("inference", []) for k, v in m["parity"].items() if k.startswith("compiled:")}
    bad = [
        f"{k}: {'; '.join(v['failures']) or 'outside ' + v['tolerance']}" for k, v in entries.items() if not v["passed"]
    ]
    return check(
        "bench/inference/torch.compile variants built and match eager",
        bool(entries) and not bad,
        f"{len(entries)} compiled variants" + (f"; {' | '.join(bad)[:600]}" if bad else ""),
    )


def _run_suite(ctx: Context, suite: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """One ``peftx bench --suite SUITE`` subprocess: its results (None if it failed) and what the JSON records."""
    cmd = bench_command(ctx, suite)
    ctx.say("bench: " + " ".join(cmd[cmd.index("bench") :]))
    if ctx.device == "cuda":
        import torch

        torch.cuda.empty_cache()  # this process's cached blocks must not shrink what the bench can use
    run = run_logged(cmd, ctx, timeout_s=ctx.subprocess_timeout(), env={"COLUMNS": "200"})
    rel = f"{BENCH_DIR}/{suite}/bench.json"
    record: dict[str, Any] = {"command": cmd, **run, "json": rel}
    path = ctx.out / rel
    if run["rc"] != 0 or not path.is_file():
        why = "timed out" if run["timed_out"] else f"peftx bench exited {run['rc']} (see the log)"
        record["checks"] = [check(f"bench/{suite}/ran", False, why)]
        return None, record
    record["checks"] = [check(f"bench/{suite}/ran", True, f"{run['seconds']:.0f} s, wrote {rel}")]
    return json.loads(path.read_text()), record
