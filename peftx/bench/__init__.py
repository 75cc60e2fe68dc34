"""Benchmarks: inference (PyTorch eager / ONNX Runtime / TensorRT), training step cost and export wall time.

Every measurement is taken in ONE run on ONE device, next to a matmul (sgemm) peak measured the same way, so achieved
FLOP/s is reported as a fraction of what this machine's GEMM really reaches, not of a datasheet number.

How the numbers are taken (the rules that make them comparable):

* models that are compared are measured **interleaved**: round after round, each variant runs once, in a fresh random
  order, so machine noise (other processes, frequency changes) hits every side alike. Ratios are the median of the
  per-round ratios (paired), with the ratio of the best cases beside them; latencies are the median (p50) with
  p90/p99 beside it (:mod:`.timing`);
* a warm-up round is run and discarded; rounds continue until a time budget is spent (at least ``min_rounds``); an
  untimed settle pause precedes every call (ONNX Runtime's worker threads spin for tens of ms after a run);
* on CPU a cheap contention probe brackets every round: a round during which another process held a core is thrown
  away and re-run (within a wall-time limit; the result says how many were discarded, or that it stayed contended);
* threads are set explicitly: ``torch.set_num_threads(threads)`` and ONNX Runtime ``intra_op_num_threads = threads``,
  ``inter_op_num_threads = 1``, where ``threads`` defaults to the number of physical cores (:mod:`.machine`,
  :mod:`.ort`);
* FLOPs are counted, not assumed (:mod:`.flops`); achieved GFLOP/s = counted FLOPs of the plain model x images/s, the
  useful work, the same for every variant;
* the backends are the library's own runners (``peftx.exports.runners``: ``TorchRunner``, ``OnnxRuntimeRunner`` with
  the pinned session options, ``TensorRTRunner``) and parity is the library's comparator; ONNX Runtime results count
  only if the graph passes parity against PyTorch (``tolerances.ONNX_FP32``) on real images; a graph that fails is
  still timed and shown, marked invalid;
* training steps use the trainer's own optimiser and parameter groups (``peftx.train.optim``); training peak memory is
  measured in a fresh subprocess per method (CPU: the process's peak RSS, reset after set-up with
  ``/proc/self/clear_refs``, glibc malloc set to mmap every block >= 64 KiB so RSS follows the live tensors; CUDA:
  ``torch.cuda.max_memory_allocated``), so one method's peak cannot hide another's; training step times are
  measured interleaved in one process.

Modules: :mod:`.config` (what to run), :mod:`.machine`, :mod:`.timing`, :mod:`.peak`, :mod:`.flops`, :mod:`.ort`,
:mod:`.suites` (inference, training, export, profile), :mod:`.driver` (run, targets, files), :mod:`.tables`,
:mod:`.plots`. The library never prints: :func:`run_benchmarks` returns plain dicts (JSON-ready) and reports progress
through a callback; :func:`write_results` saves ``bench.json`` and ``bench.png``; :func:`result_tables` turns results
into (title, columns, rows) triples for any renderer.
"""

from __future__ import annotations

from .config import (
    DEFAULT_SUITES,
    EXPORT_SECONDS_MAX,
    MERGED_OVER_PLAIN_MAX,
    METHODS,
    MODELS,
    NUM_CLASSES,
    ORT_PEAK_FRACTION_MIN,
    SUITES,
    TRAIN_BASELINES,
    TRAIN_CLASSES,
    TRAIN_METHODS,
    VERDICT_MIN_ROUNDS,
    BenchConfig,
    ModelSpec,
    Progress,
    parse_list,
)
from .driver import evaluate_targets, finalize, run_benchmarks, write_results
from .flops import count_flops, count_step_flops
from .machine import device_sync, environment, physical_cores, torch_threads
from .ort import model_dims, optimize_for_ort, ort_providers, ort_session_options
from .peak import matmul_peak, ort_matmul_peak
from .plots import plot_results
from .suites.common import adapted_copy
from .suites.training import delta_cost, run_memory_worker, train_setup
from .tables import result_tables
from .timing import (
    ContentionGuard,
    Timing,
    contention_probe,
    interleaved_timing,
    latency_stats,
    min_ratio,
    paired_ratio,
    timed_rounds,
)

__all__ = [
    "DEFAULT_SUITES",
    "EXPORT_SECONDS_MAX",
    "MERGED_OVER_PLAIN_MAX",
    "METHODS",
    "MODELS",
    "NUM_CLASSES",
    "ORT_PEAK_FRACTION_MIN",
    "SUITES",
    "TRAIN_BASELINES",
    "TRAIN_CLASSES",
    "TRAIN_METHODS",
    "VERDICT_MIN_ROUNDS",
    "BenchConfig",
    "ModelSpec",
    "Progress",
    "parse_list",
    "evaluate_targets",
    "finalize",
    "run_benchmarks",
    "write_results",
    "count_flops",
    "count_step_flops",
    "device_sync",
    "environment",
    "physical_cores",
    "torch_threads",
    "model_dims",
    "optimize_for_ort",
    "ort_providers",
    "ort_session_options",
    "matmul_peak",
    "ort_matmul_peak",
    "plot_results",
    "adapted_copy",
    "delta_cost",
    "run_memory_worker",
    "train_setup",
    "result_tables",
    "ContentionGuard",
    "Timing",
    "contention_probe",
    "interleaved_timing",
    "latency_stats",
    "min_ratio",
    "paired_ratio",
    "timed_rounds",
]
