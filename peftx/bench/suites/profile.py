"""Profile suite: torch.profiler over a few training steps of each method (the training suite's set-up)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ..config import BenchConfig, ModelSpec, Progress
from .training import train_setup


def bench_profile(spec: ModelSpec, cfg: BenchConfig, *, device: torch.device, progress: Progress) -> dict[str, Any]:
    """torch.profiler over a few training steps of each method (same backbone and batch as the training suite)."""
    out: dict[str, Any] = {"model": spec.key, "label": spec.label, "batch": cfg.train_batch, "profiles": {}}
    for m in cfg.train_methods:
        progress(f"{spec.key} profile: {m}")
        setup = train_setup(spec, m, batch=cfg.train_batch, device=device, seed=cfg.seed, amp=cfg.train_amp)
        out["img_size"] = list(setup.x.shape[-2:])
        out["profiles"][m] = profile_step(setup.step, steps=cfg.profile_steps, cuda=device.type == "cuda")
        del setup
    return out


def profile_step(step: Callable[[], Any], *, steps: int = 2, top: int = 12, cuda: bool = False) -> dict[str, Any]:
    """torch.profiler (CPU, + CUDA when asked) over ``steps`` calls of ``step`` (after one warm-up): the top ops by
    self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "top_ops": [
            {
                "op": e.key,
                "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "share": e.self_cpu_time_total / total_self,
                "calls_per_step": e.count / steps,
            }
            for e in rows
        ],
    }
