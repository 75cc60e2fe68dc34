"""Step 2: each method trained for a short run on the demo at bf16 and at fp16 + GradScaler, against a CPU FP32 run.

The run is the demo itself (``peftx train`` defaults: DINOv2 ViT-S/14, sklearn digits at 56 px, 3 epochs, batch 32;
about 100 steps), through the public :func:`peftx.train.train`. Each AMP run must (1) keep every loss finite, (2)
bring the loss down (:data:`~peftx.tolerances.TRAIN_LOSS_FALL`) and (3) end within a few points of test accuracy of
the CPU FP32 run of the same recipe, seed and data order (:data:`~peftx.tolerances.TRAIN_ACCURACY_POINTS`).

Where the CPU reference comes from: a file recorded in the repository (``benchmarks/gpu-check-cpu-reference.json``,
written by ``scripts/gpu-check.sh --record-reference`` on a CPU machine) is used for every method whose recipe
fingerprint and weights match it; any other method (a new one, a changed recipe, other weights) is trained on the
CPU in the same run. Recorded, because on the GPU machine the device minutes are the scarce resource and the CPU
runs would take about as long as all the GPU work; run here as the fallback, so a new method never goes unchecked.
``--quick`` always runs its reference here (tiny model, seconds).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peftx.backbones import DEMO_MODEL
from peftx.events import Event, Step
from peftx.fsutil import write_text_atomic
from peftx.tolerances import TRAIN_ACCURACY_POINTS, TRAIN_ACCURACY_POINTS_QUICK, TRAIN_LOSS_FALL, TRAIN_LOSS_FALL_QUICK
from peftx.train import TrainConfig, train
from peftx.train.checkpoint import load_checkpoint
from peftx.train.config import check_method_options

from .assets import TINY_ARCH, TINY_IMG, TINY_KW
from .report import Context, check, environment, error_text

AMP_RUNS = ("bf16", "fp16")
REFERENCE_KIND = "peftx gpu-check CPU FP32 reference"
# What a run computes (resolved from the recipe): the recipe fingerprint covers these TrainConfig fields only, so
# how a run executes (device, amp, paths, workers) or a field added later with its default does not change it.
RECIPE_FIELDS = (
    "model",
    "pretrained",
    "model_kwargs",
    "method",
    "method_options",
    "data",
    "data_overrides",
    "task",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "cooldown_epochs",
    "min_lr",
    "warmup_lr",
    "dropout",
    "hflip",
    "img_size",
    "seed",
    "limit_train_batches",
)


def train_plan(ctx: Context) -> dict[str, Any]:
    """TrainConfig fields shared by every run of this step (the method, device and AMP mode vary)."""
    if ctx.cfg.quick:  # 20 steps of a random tiny ViT, one epoch (one validation pass): the loss falls in seconds
        return {
            "model": TINY_ARCH,
            "weights": str(ctx.weights.path),
            "model_kwargs": dict(TINY_KW),
            "img_size": TINY_IMG,
            "data": "demo",
            "epochs": 1,
            "batch_size": 32,
            "lr": 5e-3,
            "warmup_epochs": 0.0,
            "dropout": 0.0,
            "limit_train_batches": 20,
            "seed": 42,
        }
    plan: dict[str, Any] = {"model": DEMO_MODEL, "data": "demo", "seed": 42}  # the demo recipe, as `peftx train`
    if ctx.weights.path is not None:
        plan["weights"] = str(ctx.weights.path)
    else:
        plan["pretrained"] = False
    return plan


def recipe_fingerprint(plan: dict[str, Any], method: str) -> str:
    """sha256 of the resolved TrainConfig's RECIPE_FIELDS and of the method's full config (its defaults filled in,
    so a changed default rank or target set re-keys the reference): equal fingerprints train the same thing (the
    weights are identified separately, by their tensors)."""
    d = TrainConfig(**{**plan, "method": method, "device": "cpu", "amp": "off"}).resolved().to_dict()
    d = {k: d.get(k) for k in RECIPE_FIELDS}
    d["method_config"] = check_method_options(method, d.pop("method_options") or {})  # options given = defaults
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def run_one(ctx: Context, plan: dict[str, Any], method: str, device: str, amp: str) -> dict[str, Any]:
    """One ``train()`` run; never raises (a failure is recorded with its message)."""
    losses: list[float] = []

    def progress(event: Event) -> None:
        if isinstance(event, Step):
            losses.append(float(event.loss))

    run_dir = ctx.work / f"train-{method}-{device}-{amp}"
    t0 = time.perf_counter()
    try:
        cfg = TrainConfig(**plan, method=method, device=device, amp=amp, output=str(run_dir), overwrite=True)
        summary = train(cfg, progress=progress)
    except Exception as exc:  # noqa: BLE001 - recorded and reported; the other runs still go
        return {
            "status": "error",
            "error": error_text(exc),
            "hint": getattr(exc, "hint", ""),
            "device": device,
            "amp": amp,
            "step_losses": losses,
            "wall_s": time.perf_counter() - t0,
        }
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rec = {
        "status": "ok",
        "device": summary["device"],
        "amp": summary["amp"],
        "test_accuracy": summary["test_accuracy"],
        "val_accuracy": summary["val_accuracy"],
        "best_epoch": summary["best_epoch"],
        "img_per_s": summary["img_per_s"],
        "train_seconds": summary["train_seconds"],
        "wall_s": time.perf_counter() - t0,
        "peak_memory_mb": summary["peak_memory_mb"],
        "peak_memory_kind": summary["peak_memory_kind"],
        "trainable_params": summary["trainable_params"],
        "steps": len(losses),
        "amp_skipped_steps": summary.get("amp_skipped_steps"),
        "epochs": [
            {k: r.get(k) for k in ("epoch", "train_loss", "val_loss", "val_accuracy", "img_per_s")} for r in history
        ],
        "step_losses": [round(x, 5) for x in losses],
    }
    if amp == "fp16":
        scaler = load_checkpoint(run_dir).scaler or {}
        rec["grad_scale_final"] = scaler.get("scale")  # GradScaler halves it at every overflowing step
    return rec


def loss_falls(losses: list[float], ratio: float) -> tuple[bool, str]:
    """The mean of the last quarter of step losses is below ``ratio`` x the mean of the first quarter."""
    if not losses:
        return False, "no training step ran"
    if not all(math.isfinite(x) for x in losses):
        return False, "a loss was not finite"
    k = max(1, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return last < ratio * first, (
        f"mean loss {first:.3f} over the first {k} steps -> {last:.3f} over the last "
        f"{k} (x{last / first:.3f}; must be below x{ratio})"
    )


def load_reference(path: str | None) -> dict[str, Any] | None:
    if not path or not Path(path).is_file():
        return None
    data = json.loads(Path(path).read_text())
    return data if data.get("kind") == REFERENCE_KIND else None


def pick_reference(
    recorded: dict[str, Any] | None, method: str, fingerprint: str, weights_id: str
) -> tuple[dict[str, Any] | None, str]:
    """The recorded reference entry for ``method`` if it was made with this recipe and these weights."""
    if recorded is None:
        return None, "no recorded reference file"
    if recorded.get("weights_sha256") != weights_id:
        return None, "the recorded reference used other weights"
    entry = recorded.get("runs", {}).get(method)
    if entry is None:
        return None, f"the recorded reference has no {method} run"
    if entry.get("fingerprint") != fingerprint:
        return None, "the recorded reference used another recipe"
    when = entry.get("recorded") or recorded.get("created", "?")
    return entry, f"recorded {when} ({recorded.get('environment', {}).get('torch', '?')})"


def run_train_check(ctx: Context) -> dict[str, Any]:
    plan = train_plan(ctx)
    points = TRAIN_ACCURACY_POINTS_QUICK if ctx.cfg.quick else TRAIN_ACCURACY_POINTS
    fall = TRAIN_LOSS_FALL_QUICK if ctx.cfg.quick else TRAIN_LOSS_FALL
    recorded = None if ctx.cfg.quick else load_reference(ctx.cfg.reference)
    weights_id = ctx.weights.info["sha256"]
    result: dict[str, Any] = {
        "plan": {k: v for k, v in plan.items() if k != "weights"},
        "device": ctx.device,
        "accuracy_points_allowed": points,
        "loss_fall_ratio": fall,
        "reference_file": ctx.cfg.reference,
        "methods": {},
        "checks": [],
    }
    checks = result["checks"]
    for method in ctx.cfg.resolved_methods():
        fingerprint = recipe_fingerprint(plan, method)
        ref, how = pick_reference(recorded, method, fingerprint, weights_id)
        if ref is None and ctx.out_of_time():
            ref = {"status": "not run", "error": "the time limit was spent"}
            checks.append(ctx.not_run(f"train/{method}/cpu-fp32/ran"))
        elif ref is None:
            ctx.say(f"train: {method} on cpu, fp32 (the reference: {how})")
            ref = run_one(ctx, plan, method, "cpu", "off")
            ref["source"] = f"trained on the CPU in this run ({how})"
        else:
            ref = {**ref, "source": how}
        ref["fingerprint"] = fingerprint
        entry: dict[str, Any] = {"reference": ref, "runs": {}}
        result["methods"][method] = entry
        ref_ok = ref.get("status", "ok") == "ok"
        if ref_ok and "step_losses" in ref:
            ok, detail = loss_falls(ref["step_losses"], fall)
            checks.append(check(f"train/{method}/cpu-fp32/loss falls", ok, detail))
        elif ref.get("status") == "error":
            checks.append(check(f"train/{method}/cpu-fp32/ran", False, ref.get("error", "")))
        if ctx.cfg.record_reference:
            continue
        for amp in AMP_RUNS:
            name = f"train/{method}/{ctx.device}-{amp}"
            if ctx.device == "cpu" and amp == "fp16":
                entry["runs"][amp] = {"status": "skipped", "reason": "peftx runs fp16 autocast on CUDA only"}
                checks.append(check(f"{name}/ran", None, "fp16 autocast is CUDA-only in peftx"))
                continue
            if ctx.out_of_time():
                entry["runs"][amp] = {"status": "not run", "reason": "the time limit was spent"}
                checks.append(ctx.not_run(f"{name}/ran"))
                continue
            ctx.say(f"train: {method} on {ctx.device}, {amp}" + (" + GradScaler" if amp == "fp16" else ""))
            run = run_one(ctx, plan, method, ctx.device, amp)
            entry["runs"][amp] = run
            if run["status"] != "ok":
                checks.append(check(f"{name}/ran", False, run["error"]))
                continue
            ok, detail = loss_falls(run["step_losses"], fall)
            checks.append(check(f"{name}/loss falls", ok, detail))
            if ref_ok:
                diff = 100 * (run["test_accuracy"] - ref["test_accuracy"])
                run["accuracy_vs_reference_points"] = diff
                checks.append(
                    check(
                        f"{name}/accuracy vs cpu",
                        abs(diff) <= points,
                        f"test {100 * run['test_accuracy']:.2f} % vs cpu fp32 "
                        f"{100 * ref['test_accuracy']:.2f} % ({diff:+.2f} points, allowed {points})",
                    )
                )
    if ctx.cfg.record_reference:
        path = record_reference(ctx, result, weights_id)
        result["recorded_to"] = str(path)
    result["status"] = "ok" if all(c["ok"] is not False for c in checks) else "failed"
    return result


def record_reference(ctx: Context, result: dict[str, Any], weights_id: str) -> Path:
    """Write the CPU runs of this step as the reference later GPU runs compare with. Entries an existing file holds
    for other methods (same weights) are kept, so one method can be (re-)recorded alone with --methods."""
    keep = (
        "fingerprint",
        "status",
        "test_accuracy",
        "val_accuracy",
        "best_epoch",
        "train_seconds",
        "steps",
        "epochs",
        "step_losses",
        "img_per_s",
    )
    old = load_reference(ctx.cfg.record_reference)
    runs = dict(old["runs"]) if old and old.get("weights_sha256") == weights_id else {}
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    runs.update(
        {
            m: {**{k: e["reference"].get(k) for k in keep}, "recorded": now}
            for m, e in result["methods"].items()
            if e["reference"].get("status") == "ok"
        }
    )
    data = {
        "kind": REFERENCE_KIND,
        "schema": 1,
        "created": now,
        "weights_sha256": weights_id,
        "weights": ctx.weights.info.get("what"),
        "environment": {k: v for k, v in environment("cpu").items() if k != "executable"},
        "runs": runs,
    }
    assert ctx.cfg.record_reference is not None  # called for --record-reference only
    return write_text_atomic(Path(ctx.cfg.record_reference), json.dumps(data, indent=2) + "\n")
