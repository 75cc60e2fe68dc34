"""The timing engine: interleaved rounds with a contention probe, latency statistics and paired ratios."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .machine import loadavg, torch_threads


class ContentionGuard:
    """Tells whether another process is holding the cores right now, cheaply (~2 ms on an idle machine).

    It times a small elementwise op (best of ``reps``) with ``threads`` threads and with one: on an idle machine the
    multi-threaded op is faster (x0.5 here); when another process holds a core, every OpenMP parallel region waits for
    a descheduled thread and it becomes 10-30x slower than the single-threaded one. Clean means multi-threaded <=
    ``factor`` x the best single-threaded time seen. A timing round bracketed by two clean probes is clean.
    """

    def __init__(self, threads: int, *, reps: int = 5, factor: float = 2.0):
        self.threads, self.reps, self.factor = threads, reps, factor
        self._a, self._b = torch.randn(1536, 384), torch.randn(1536, 384)
        self.best_single = math.inf

    def _best(self, threads: int) -> float:
        with torch_threads(threads):
            best = math.inf
            for _ in range(self.reps):
                t0 = time.perf_counter()
                torch.mul(self._a, self._b)
                best = min(best, time.perf_counter() - t0)
        return best

    def clean(self) -> bool:
        self.best_single = min(self.best_single, self._best(1))
        return self._best(self.threads) <= self.factor * self.best_single


@dataclass
class Timing:
    """Per-call seconds of every variant (index i = round i in every list) and how the rounds went."""

    times: dict[str, list[float]]
    rounds: int  # rounds kept
    discarded: int = 0  # rounds thrown away because a contention probe before or after them failed
    contended: bool = False  # too few clean rounds: the kept rounds include contended ones

    def to_json(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "discarded_rounds": self.discarded, "contended": self.contended}


def timed_rounds(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 1,
    min_rounds: int = 3,
    max_rounds: int = 30,
    budget_s: float = 10.0,
    sync: Callable[[], None] | None = None,
    settle_s: float = 0.0,
    seed: int = 0,
    guard: ContentionGuard | None = None,
    max_wall_s: float | None = None,
) -> Timing:
    """Seconds per call of every function, measured in rounds: each round runs every function once, in a fresh
    random order (seeded), so no variant always follows the same neighbour.

    ``warmup`` rounds are run first and discarded. ``settle_s`` is slept (untimed) before every timed call: ONNX
    Runtime's idle worker threads spin for tens of milliseconds after a run and would slow whatever runs next on the
    same cores. Rounds continue until ``budget_s`` of timed calls is spent, at least ``min_rounds`` and at most
    ``max_rounds`` (kept rounds). With a ``guard``, a round that a failed contention probe brackets is discarded and
    re-run, until ``max_wall_s`` (default: the larger of 1.5 x the wall time of ``min_rounds`` rounds and 2 x
    ``budget_s``) is used up; if fewer than
    ``min_rounds`` clean rounds were collected by then, every round is kept and the result is marked ``contended``.
    """
    names = list(fns)
    if not names:
        return Timing({}, 0)
    sync = sync or (lambda: None)
    rng = np.random.default_rng(seed)
    for _ in range(max(0, warmup)):
        for name in names:
            fns[name]()
            sync()
    clean: dict[str, list[float]] = {n: [] for n in names}
    every: dict[str, list[float]] = {n: [] for n in names}
    spent, kept, total, started = 0.0, 0, 0, time.perf_counter()
    limit = max_wall_s

    def probe() -> bool:
        if guard is None:
            return True
        if settle_s:
            time.sleep(settle_s)
        return guard.clean()

    before = probe()
    while kept < max(1, max_rounds) and (kept < min_rounds or spent < budget_s):
        t_round = time.perf_counter()
        this: dict[str, float] = {}
        for i in rng.permutation(len(names)):
            name = names[i]
            if settle_s:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            fns[name]()
            sync()
            this[name] = time.perf_counter() - t0
        after = probe()
        total += 1
        for name, dt in this.items():
            every[name].append(dt)
        if before and after:
            for name, dt in this.items():
                clean[name].append(dt)
            spent += sum(this.values())
            kept += 1
        before = after
        if limit is None:
            limit = max(1.5 * max(1, min_rounds) * (time.perf_counter() - t_round), 2.0 * budget_s)
        if time.perf_counter() - started > limit and kept < min_rounds and total >= min_rounds:
            return Timing(every, total, 0, contended=True)
    return Timing(clean, kept, total - kept)


def interleaved_timing(fns: Mapping[str, Callable[[], Any]], **kwargs: Any) -> dict[str, list[float]]:
    """:func:`timed_rounds` without the round bookkeeping: name -> seconds per call, index i = round i."""
    return timed_rounds(fns, **kwargs).times


# The probe's multi-thread / single-thread time above which the machine counts as contended: idle, the ratio is <= 1;
# with the cores taken it was x10-x30 (2 shared cores), so 3 leaves room for an idle machine's noise.
CONTENDED_RATIO = 3.0


def _time_mul(threads: int, reps: int) -> float:
    """Milliseconds per call of the probe op (a small elementwise mul, 0.6 M floats) with ``threads`` threads."""
    a, b = torch.randn(1536, 384), torch.randn(1536, 384)
    with torch_threads(threads):
        torch.mul(a, b)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mul(a, b)
        return (time.perf_counter() - t0) / reps * 1e3


def contention_probe(threads: int, *, reps: int = 50, time_op: Callable[[int], float] | None = None) -> dict[str, Any]:
    """Time of a small elementwise op (0.6 M floats) with ``threads`` threads vs 1 thread.

    On an idle machine the multi-threaded op is at least as fast; when other processes hold the cores, every OpenMP
    parallel region waits for a descheduled thread and the ratio explodes (x10-x30 seen on 2 shared cores), which
    inflates every op-heavy measurement (training steps, small batches). Reported so results can be judged.
    ``time_op(threads)``: milliseconds per op (default: the real op, timed over ``reps`` calls).
    """
    timer = time_op or (lambda n: _time_mul(n, reps))
    out = {n: timer(n) for n in sorted({1, threads})}
    ratio = out[threads] / out[1]
    return {
        "op": "mul 1536x384 fp32",
        f"ms_{threads}_threads": out[threads],
        "ms_1_thread": out[1],
        "ratio": ratio,
        "contended": bool(threads > 1 and ratio > CONTENDED_RATIO),
        "loadavg": loadavg(),
    }


def latency_stats(times: Sequence[float], batch: int, flops_per_image: float | None) -> dict[str, Any]:
    """p50/p90/p99/mean in ms, images/s at p50, achieved GFLOP/s at p50 (of ``flops_per_image``)."""
    a = np.asarray(times, dtype=np.float64)
    p50 = float(np.percentile(a, 50))
    out: dict[str, float | None] = {
        "n": int(a.size),
        "p50_ms": 1e3 * p50,
        "p90_ms": 1e3 * float(np.percentile(a, 90)),
        "p99_ms": 1e3 * float(np.percentile(a, 99)),
        "mean_ms": 1e3 * float(a.mean()),
        "min_ms": 1e3 * float(a.min()),
        "images_per_s": batch / p50,
    }
    out["gflops"] = flops_per_image * batch / p50 / 1e9 if flops_per_image else None
    return out


def min_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """min(num) / min(den): the ratio of best cases, robust when interference (which only ever adds time) is bursty."""
    return float(min(num) / min(den)) if len(num) and len(den) else math.nan


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[i] / den[i] (both measured in the same round)."""
    n = min(len(num), len(den))
    if n == 0:
        return math.nan
    return float(np.median(np.asarray(num[:n]) / np.asarray(den[:n])))


def contention_guard(enabled: bool, threads: int, device: torch.device) -> ContentionGuard | None:
    """A contention guard for CPU runs with more than one thread (where other processes hurt most), if enabled."""
    if not enabled or device.type != "cpu" or threads < 2:
        return None
    return ContentionGuard(threads)
