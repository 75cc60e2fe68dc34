"""Benchmarks: inference (PyTorch eager / ONNX Runtime / TensorRT), training step cost and export wall time.

Every measurement is taken in ONE run on ONE device, next to a matmul (sgemm) peak measured the same way, so achieved
FLOP/s is reported as a fraction of what this machine's GEMM really reaches, not of a datasheet number.

How the numbers are taken (the rules that make them comparable):

* models that are compared are measured **interleaved**: round after round, each variant runs once, in a fresh random
  order, so machine noise (other processes, frequency changes) hits every side alike. Ratios are the median of the
  per-round ratios (paired), with the ratio of the best cases beside them; latencies are the median (p50) with
  p90/p99 beside it;
* a warm-up round is run and discarded; rounds continue until a time budget is spent (at least ``min_rounds``); an
  untimed settle pause precedes every call (ONNX Runtime's worker threads spin for tens of ms after a run);
* on CPU a cheap contention probe brackets every round: a round during which another process held a core is thrown
  away and re-run (within a wall-time limit; the result says how many were discarded, or that it stayed contended);
* threads are set explicitly: ``torch.set_num_threads(threads)`` and ONNX Runtime ``intra_op_num_threads = threads``,
  ``inter_op_num_threads = 1``, where ``threads`` defaults to the number of physical cores;
* FLOPs are counted, not assumed (``torch.utils.flop_counter.FlopCounterMode`` over one forward of the plain model);
  achieved GFLOP/s = counted FLOPs of the plain model x images/s, the useful work, the same for every variant;
* ONNX Runtime results count only if the graph passes parity against PyTorch (``tolerances.ONNX_FP32``) on real
  images; a graph that fails is still timed and shown, marked invalid;
* training peak memory is measured in a fresh subprocess per method (CPU: the process's peak RSS, reset after set-up
  with ``/proc/self/clear_refs``, glibc malloc set to mmap every block >= 64 KiB so RSS follows the live tensors;
  CUDA: ``torch.cuda.max_memory_allocated``), so one method's peak cannot hide another's; training step times are
  measured interleaved in one process.

The library never prints: :func:`run_benchmarks` returns plain dicts (JSON-ready) and reports progress through a
callback; :func:`write_results` saves ``bench.json`` and ``bench.png``; :func:`result_tables` turns results into
(title, columns, rows) triples for any renderer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .errors import UsageError

Progress = Callable[[str], None]

SUITES = ("inference", "training", "export", "profile")
DEFAULT_SUITES = ("inference", "training", "export")
METHODS = ("rlrr", "aoft", "lora")
TRAIN_METHODS = ("full", "frozen", "lora", "rlrr", "aoft")
# Baselines that are not adapter methods: full fine-tuning, and "frozen": backbone frozen, head trained, gradient
# still flowing back to the patch tokens as it must for adapters in every block. method / frozen is what the method
# itself adds to back-propagating through the backbone (a near-floor: LoRA/AOFT on q, v skip block 0's input
# gradient, which the reference computes, so they can come out a little under 1).
TRAIN_BASELINES = ("full", "frozen")
NUM_CLASSES = 1000  # ImageNet-size head for inference: the standard FLOP count (ViT-B/16 224 px: 35.1 GFLOP)
TRAIN_CLASSES = 100
MATMUL_N = 2048

# Targets the benchmark checks (from the project's issue).
MERGED_OVER_PLAIN_MAX = 1.02  # merged latency / plain latency, every backend
ORT_PEAK_FRACTION_MIN = 0.85  # ONNX Runtime FP32 ViT-B/16: achieved FLOP/s / measured matmul peak
EXPORT_SECONDS_MAX = 30.0  # merge + ONNX export of ViT-B/16


# ----------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A backbone to benchmark: timm name (or peftx's DEMO_MODEL), weights, and sizes."""

    key: str
    name: str
    label: str
    pretrained: bool = False  # True only where real weights exist offline (the DINOv2 demo backbone)
    img_size: int | None = None  # inference size (None: the model's default)
    train_img_size: int | None = None  # training size (None: img_size)
    kwargs: tuple[tuple[str, Any], ...] = ()  # extra timm kwargs (tiny test models)
    ort_model_type: str = "vit"  # onnxruntime.transformers.optimizer model_type

    def build(self, num_classes: int, *, train: bool = False) -> nn.Module:
        from .backbones import create_backbone

        size = (self.train_img_size or self.img_size) if train else self.img_size
        model = create_backbone(self.name, num_classes=num_classes, pretrained=self.pretrained, img_size=size,
                                **dict(self.kwargs))
        return model.eval()


def _demo_model() -> str:
    from .backbones import DEMO_MODEL

    return DEMO_MODEL


MODELS: dict[str, ModelSpec] = {
    "vit_s14": ModelSpec("vit_s14", _demo_model(), "ViT-S/14 DINOv2 (real demo weights)", pretrained=True,
                         img_size=224, train_img_size=112),
    "vit_b16": ModelSpec("vit_b16", "vit_base_patch16_224", "ViT-B/16 (random init)", train_img_size=112),
    "swin_t": ModelSpec("swin_t", "swin_tiny_patch4_window7_224", "Swin-T (random init)", ort_model_type="swin"),
    # smoke runs only (the GPU check's CPU mode): milliseconds per step on 2 cores
    "tiny": ModelSpec("tiny", "vit_tiny_patch16_224", "ViT-Ti/16 depth 2 (random init; smoke runs)", img_size=64,
                      kwargs=(("depth", 2),)),
}
# --dtype: the precision the PyTorch variants run in (weights and inputs cast); the matmul peak is measured in it.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# --compile: the variants torch.compile also times (the merged method's unmerged form: the costliest to compile).
COMPILED_VARIANTS = ("plain", "merged", "unmerged")


# ----------------------------------------------------------------------------------------------------- config


@dataclass
class BenchConfig:
    """What to run and how hard. :meth:`quick` gives the minutes-long preset."""

    suites: tuple[str, ...] = DEFAULT_SUITES
    models: tuple[str, ...] = ("vit_s14", "vit_b16", "swin_t")  # inference
    batches: tuple[int, ...] = (1, 32)
    methods: tuple[str, ...] = METHODS  # unmerged adapter variants at inference; the first one is merged
    train_models: tuple[str, ...] = ("vit_s14",)
    train_methods: tuple[str, ...] = TRAIN_METHODS
    export_models: tuple[str, ...] = ("vit_s14", "vit_b16")
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # None: physical cores
    onnxruntime: bool = True
    ort_fused: bool = True  # also time the onnxruntime.transformers.optimizer graph
    tensorrt: str = "auto"  # auto | off
    dtype: str = "fp32"  # PyTorch inference precision: fp32 | bf16 | fp16 (ONNX Runtime / TensorRT stay FP32)
    compile: str = "off"  # off, or a torch.compile backend (inductor; eager = dynamo tracing only) for "compiled"
    # inference timing: rounds adapt to budget_s per (model, batch), within [min_rounds, max_rounds]
    warmup: int = 1
    min_rounds: int = 5
    max_rounds: int = 30
    budget_s: float = 20.0
    settle_s: float = 0.05  # untimed pause before each timed call (ONNX Runtime's threads spin after a run)
    discard_contended: bool = True  # CPU: re-run rounds during which another process held a core
    # training
    train_batch: int = 32
    train_img_size: int | None = None  # None: the model spec's training size
    train_amp: str = "off"  # off | bf16 | fp16 (with a GradScaler), as peftx train --amp
    train_warmup: int = 1
    train_rounds: int = 4
    train_budget_s: float = 30.0
    memory_steps: int = 2
    isolate_memory: bool = True  # one subprocess per method for the peak memory
    delta_reps: int = 5
    profile_steps: int = 2
    # export
    export_bundle: bool = False  # also time peftx's whole bundle writer (export + FP16 + every parity check)
    parity_images: int = 4
    matmul_n: int = MATMUL_N
    matmul_reps: int = 10
    seed: int = 0
    quick_preset: bool = False
    specs: dict[str, ModelSpec] = field(default_factory=dict)  # extra / replacement model specs (tests)
    work_dir: str | None = None  # where ONNX files go (a temporary directory when None)

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A couple of minutes on 2 cores: ViT-S only, two adapter variants, tiny repetition counts."""
        base = dict(models=("vit_s14",), batches=(1, 8), methods=("rlrr", "lora"), train_models=("vit_s14",),
                    export_models=("vit_s14",), min_rounds=2, max_rounds=8, budget_s=4.0, train_rounds=2,
                    train_budget_s=4.0, memory_steps=1, delta_reps=3, profile_steps=1, matmul_reps=5,
                    quick_preset=True)
        base.update(overrides)
        return cls(**base)

    def spec(self, key: str) -> ModelSpec:
        table = {**MODELS, **self.specs}
        if key not in table:
            raise UsageError(f"unknown benchmark model {key!r}", f"choose from {', '.join(table)}")
        return table[key]

    def validate(self) -> None:
        bad = [s for s in self.suites if s not in SUITES]
        if bad or not self.suites:
            raise UsageError(f"unknown suite(s) {bad or '(none)'}", f"choose from {', '.join(SUITES)}")
        for key in (*self.models, *self.train_models, *self.export_models):
            self.spec(key)
        if not self.batches or any(b < 1 for b in self.batches):
            raise UsageError(f"batch sizes must be >= 1, got {list(self.batches)}", "e.g. --batch 1,32")
        from .methods import METHOD_NAMES

        if not self.methods or not self.train_methods:
            raise UsageError("no adapter method to benchmark", f"name at least one of {', '.join(METHOD_NAMES)}")
        bad = [m for m in self.methods if m not in METHOD_NAMES]
        bad += [m for m in self.train_methods if m not in TRAIN_BASELINES and m not in METHOD_NAMES]
        if bad:
            raise UsageError(f"unknown method(s) {bad}", f"choose from {', '.join(TRAIN_BASELINES + METHOD_NAMES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"device {self.device!r}", "choose auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("device cuda was asked for but no CUDA GPU is visible", "use --device cpu")
        if self.tensorrt not in ("auto", "off"):
            raise UsageError(f"tensorrt {self.tensorrt!r}", "choose auto or off")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype {self.dtype!r}", f"choose from {', '.join(DTYPES)}")
        if self.train_amp not in ("off", "bf16", "fp16"):
            raise UsageError(f"train amp {self.train_amp!r}", "choose off, bf16 or fp16")
        if self.train_amp != "off":
            from .evaluate import resolve_amp

            resolve_amp(self.train_amp, resolve_device(self.device))  # fp16 autocast on CPU is refused here
        if self.train_img_size is not None and self.train_img_size < 1:
            raise UsageError(f"train image size must be >= 1, got {self.train_img_size}")


def parse_list(text: str | Sequence[str] | None, *, kind: type = str) -> tuple:
    """'a,b' -> ('a', 'b'); already-split sequences pass through (converted with ``kind``)."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        return tuple(kind(i.strip()) for i in items if str(i).strip())
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


# ----------------------------------------------------------------------------------------------------- machine


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads not counted)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        phys = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = value.strip()
            elif key == "core id":
                core = value.strip()
            elif not line.strip() and core:
                cores.add((phys, core))
                phys = core = ""
        if core:
            cores.add((phys, core))
    except OSError:
        pass
    return max(1, min(allowed, len(cores) if cores else allowed))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def environment(threads: int, device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
        "threads": threads, "device": str(device),
        "thread_settings": f"torch.set_num_threads({threads}); onnxruntime intra_op_num_threads={threads}, "
                           "inter_op_num_threads=1, ORT_SEQUENTIAL, ORT_ENABLE_ALL",
        "loadavg_start": _loadavg(),
    }
    for mod in ("timm", "onnx", "onnxruntime", "onnxslim"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is a fact to report, not an error
            info[mod] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _guard(cfg: BenchConfig, threads: int, device: torch.device) -> ContentionGuard | None:
    """A contention guard for CPU runs with more than one thread (where other processes hurt most), if enabled."""
    if not cfg.discard_contended or device.type != "cpu" or threads < 2:
        return None
    return ContentionGuard(threads)


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# ----------------------------------------------------------------------------------------------------- timing


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


def timed_rounds(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1, min_rounds: int = 3,
                 max_rounds: int = 30, budget_s: float = 10.0, sync: Callable[[], None] | None = None,
                 settle_s: float = 0.0, seed: int = 0, guard: ContentionGuard | None = None,
                 max_wall_s: float | None = None) -> Timing:
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


def contention_probe(threads: int, *, reps: int = 50) -> dict[str, Any]:
    """Time of a small elementwise op (0.6 M floats) with ``threads`` threads vs 1 thread.

    On an idle machine the multi-threaded op is at least as fast; when other processes hold the cores, every OpenMP
    parallel region waits for a descheduled thread and the ratio explodes (x10-x30 seen on 2 shared cores), which
    inflates every op-heavy measurement (training steps, small batches). Reported so results can be judged.
    """
    a, b = torch.randn(1536, 384), torch.randn(1536, 384)
    out = {}
    for n in sorted({1, threads}):
        with torch_threads(n):
            torch.mul(a, b)
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mul(a, b)
            out[n] = (time.perf_counter() - t0) / reps * 1e3
    ratio = out[threads] / out[1]
    return {"op": "mul 1536x384 fp32", f"ms_{threads}_threads": out[threads], "ms_1_thread": out[1],
            "ratio": ratio, "contended": bool(threads > 1 and ratio > 3.0), "loadavg": _loadavg()}


def latency_stats(times: Sequence[float], batch: int, flops_per_image: float | None) -> dict[str, Any]:
    """p50/p90/p99/mean in ms, images/s at p50, achieved GFLOP/s at p50 (of ``flops_per_image``)."""
    a = np.asarray(times, dtype=np.float64)
    p50 = float(np.percentile(a, 50))
    out = {"n": int(a.size), "p50_ms": 1e3 * p50, "p90_ms": 1e3 * float(np.percentile(a, 90)),
           "p99_ms": 1e3 * float(np.percentile(a, 99)), "mean_ms": 1e3 * float(a.mean()),
           "min_ms": 1e3 * float(a.min()), "images_per_s": batch / p50}
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


# ----------------------------------------------------------------------------------------------------- peak


def matmul_peak(n: int = MATMUL_N, *, reps: int = 10, warmup: int = 3, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Best-of-``reps`` GFLOP/s of an n x n x n GEMM (torch.mm into a preallocated output); TF32 off on CUDA."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    b = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    sync = _sync(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for _ in range(warmup):
            torch.mm(a, b, out=c)
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    flop = 2.0 * n ** 3
    return {"backend": f"torch.mm ({device.type})", "n": n, "dtype": str(dtype).replace("torch.", ""), "reps": reps,
            "gflops": flop / min(times) / 1e9, "median_gflops": flop / float(np.median(times)) / 1e9}


def ort_matmul_peak(n: int = MATMUL_N, *, reps: int = 10, warmup: int = 3, threads: int = 1) -> dict[str, Any]:
    """The same GEMM as one ONNX MatMul node under ONNX Runtime's CPU provider (MLAS): its own sgemm ceiling."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "sgemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # opset 17's IR: onnx 1.23 writes 14 by default, ONNX Runtime 1.30 reads at most 13
    session = ort.InferenceSession(model.SerializeToString(), ort_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"A": rng.standard_normal((n, n), dtype=np.float32), "B": rng.standard_normal((n, n), dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    flop = 2.0 * n ** 3
    return {"backend": "onnxruntime MatMul (MLAS)", "n": n, "dtype": "float32", "reps": reps,
            "gflops": flop / min(times) / 1e9, "median_gflops": flop / float(np.median(times)) / 1e9}


# ----------------------------------------------------------------------------------------------------- FLOPs


def count_flops(model: nn.Module, input_size: Sequence[int], *, batch: int = 1,
                device: torch.device | str = "cpu") -> float:
    """FLOPs per image of one forward (GEMM/conv/attention matmuls; 1 MAC = 2 FLOPs), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *input_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / batch


def count_step_flops(step: Callable[[], Any], batch: int) -> float:
    """FLOPs per image of one training step (forward + backward; the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch


# ----------------------------------------------------------------------------------------------------- helpers


def adapted_copy(plain: nn.Module, method: str, *, seed: int = 0, perturb_std: float = 0.05,
                 fingerprint: str | None = None) -> nn.Module:
    """A deep copy of ``plain`` with ``method``'s adapter, every trainable tensor moved off its init.

    The head is kept (not zeroed) and zero-initialised tensors (LoRA B, AOFT λ, the RLRR shift) are perturbed, so the
    merged model really differs from the plain one and a parity check cannot pass by accident.
    """
    from .adapter import adapt
    from .methods import make_config

    model = adapt(copy.deepcopy(plain), make_config(method), zero_head=False,
                  base_fingerprint=fingerprint or "benchmark (not computed)")
    gen = torch.Generator().manual_seed(seed)
    head = model.peftx_state.layout.head + "."
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith(head):
                p.add_(torch.randn(p.shape, generator=gen) * perturb_std)
    return model.eval()


def _freeze_all_but(model: nn.Module, trainable: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(trainable)


def _model_dims(model: nn.Module) -> tuple[int, int]:
    """(num_heads, hidden_size) for ORT's ViT attention fusion; (0, 0) lets it detect them."""
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) and hasattr(blocks[0], "attn"):
        return int(getattr(blocks[0].attn, "num_heads", 0)), int(getattr(model, "embed_dim", 0))
    return 0, 0


class _Quiet:
    """Silence Python logging (the transformer optimizer logs warnings about producer names) for a block."""

    def __enter__(self) -> None:
        logging.disable(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        logging.disable(logging.NOTSET)


# ----------------------------------------------------------------------------------------------------- ONNX Runtime


def ort_session_options(threads: int, *, level: str = "all", spinning: bool = True):
    """Explicit ONNX Runtime settings: ``threads`` intra-op, 1 inter-op, sequential, graph optimisation ``level``."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def ort_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class SessionRunner:
    """An open ONNX Runtime session as a parity runner (``infer(batch) -> logits``) and a timing callable."""

    def __init__(self, path: str | Path, threads: int, *, name: str, device: torch.device | None = None,
                 level: str = "all", spinning: bool = True):
        import onnxruntime as ort

        self.name, self.path = name, Path(path)
        self.session = ort.InferenceSession(str(path), ort_session_options(threads, level=level, spinning=spinning),
                                            providers=ort_providers(device or torch.device("cpu")))
        self.input_name = self.session.get_inputs()[0].name

    def __enter__(self) -> SessionRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0],
                          dtype=np.float32)


def optimize_for_ort(src: str | Path, dst: str | Path, *, model_type: str, num_heads: int = 0,
                     hidden_size: int = 0) -> dict[str, Any]:
    """Run ``onnxruntime.transformers.optimizer.optimize_model`` (attention/LayerNorm/GELU fusion); returns stats.

    Never raises: a model the optimizer cannot handle gives ``{"ok": False, "reason": ...}``.
    """
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        with _Quiet():
            optimized = optimize_model(str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size)
            fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
            optimized.save_model_to_file(str(dst))
    except Exception as exc:  # noqa: BLE001 - the optimizer is optional; any failure is a reported skip
        return {"ok": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return {"ok": True, "model_type": model_type, "fused_ops": fused}


def _parity(expected: dict[str, np.ndarray], runner: Any, inputs: dict[str, np.ndarray], tolerance: Any,
            reference_name: str) -> dict[str, Any]:
    from .exports.parity import compare

    result = compare(expected, runner, inputs, tolerance, reference_name=reference_name)
    o = result.overall
    return {"passed": result.passed, "tolerance": tolerance.name, "max_abs": o.max_abs, "bound": o.bound,
            "min_cosine": o.min_cosine, "top1": o.top1_agreement, "reference": reference_name,
            "failures": o.failures[:3]}


def _torch_outputs(model: nn.Module, inputs: dict[str, np.ndarray], device: torch.device) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        return {k: model(torch.from_numpy(v).to(device)).float().cpu().numpy() for k, v in inputs.items()}


# ----------------------------------------------------------------------------------------------------- inference


def bench_inference(spec: ModelSpec, cfg: BenchConfig, *, threads: int, device: torch.device, work_dir: Path,
                    progress: Progress) -> dict[str, Any]:
    """Plain vs unmerged vs merged (eager), plain vs merged (ONNX Runtime, fused ORT, TensorRT), per batch size."""
    from .adapter import merge_and_unload
    from .backbones import data_config
    from .data import real_images
    from .exports.parity import make_input_sets
    from .tolerances import MERGE_FP32

    say = progress
    torch.manual_seed(cfg.seed)
    say(f"{spec.key}: building the plain backbone and {len(cfg.methods)} adapted copies")
    plain = spec.build(NUM_CLASSES)
    dcfg = data_config(plain)
    input_size = tuple(int(v) for v in dcfg["input_size"])
    flops = count_flops(plain, input_size)
    unmerged = {m: adapted_copy(plain, m, seed=cfg.seed + i) for i, m in enumerate(cfg.methods)}
    merged_method = cfg.methods[0]
    merged = merge_and_unload(unmerged[merged_method]).eval()
    out: dict[str, Any] = {"model": spec.key, "label": spec.label, "timm_name": spec.name,
                           "input_size": list(input_size), "dtype": cfg.dtype,
                           "gflop_per_image": flops / 1e9, "merged_method": merged_method, "rows": [], "ratios": [],
                           "parity": {}, "notes": []}
    images = real_images(cfg.parity_images, dcfg).numpy()
    inputs = make_input_sets(images, (len(images),), random_batch=2)
    ref_plain = _torch_outputs(plain, inputs, torch.device("cpu"))
    ref_unmerged = _torch_outputs(unmerged[merged_method], inputs, torch.device("cpu"))
    from .exports.runners import TorchRunner

    out["parity"]["eager:merged"] = _parity(ref_unmerged, TorchRunner(merged, name="merged PyTorch"), inputs,
                                            MERGE_FP32, f"unmerged {merged_method} (PyTorch)")

    # --- backends ---
    modules = {"plain": plain, "merged": merged, **{f"unmerged-{m}": unmerged[m] for m in cfg.methods}}
    for m in modules.values():
        m.to(device)
    sessions: dict[str, SessionRunner] = {}
    if cfg.onnxruntime:
        sessions = _ort_sessions(spec, cfg, plain, merged, input_size, threads, device, work_dir, inputs,
                                 {"plain": ref_plain, "merged": ref_unmerged}, merged_method, out, say)
    engines = _tensorrt_runners(cfg, work_dir, spec, max(cfg.batches), inputs,
                                {"plain": ref_plain, "merged": ref_unmerged}, out, say)

    dtype = DTYPES[cfg.dtype]
    for m in modules.values():  # after the FP32 exports and parity: only the timed PyTorch variants change
        m.to(dtype)
        if device.type == "cuda":  # GPU users run timm's fused SDPA attention (peftx's evaluate does too)
            from .evaluate import use_fused_attention

            use_fused_attention(m)
    out["attention"] = "fused SDPA" if device.type == "cuda" else "timm exportable (no SDPA), as exported"
    sync = _sync(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    for batch in cfg.batches:
        x = torch.randn(batch, *input_size, generator=gen)
        xd, xn = x.to(device, dtype), x.numpy()
        fns: dict[str, Callable[[], Any]] = {}
        for variant, module in modules.items():
            fns[f"eager:{variant}"] = (lambda mod=module: mod(xd))
        if cfg.compile != "off":
            fns.update(_compiled_variants(modules, merged_method, xd, cfg.compile, out, batch, say))
        for key, runner in sessions.items():
            fns[key] = (lambda r=runner: r.infer(xn))
        for key, runner in engines.items():
            fns[key] = (lambda r=runner: r.infer(xn))
        say(f"{spec.key} batch {batch}: timing {len(fns)} variants interleaved")
        with torch.inference_mode():
            timing = timed_rounds(fns, warmup=cfg.warmup, min_rounds=cfg.min_rounds, max_rounds=cfg.max_rounds,
                                  budget_s=cfg.budget_s, sync=sync, settle_s=cfg.settle_s, seed=cfg.seed,
                                  guard=_guard(cfg, threads, device))
        times = timing.times
        out.setdefault("timing", {})[str(batch)] = timing.to_json()
        for key, ts in times.items():
            backend, _, variant = key.partition(":")
            parity = out["parity"].get(f"{key}@b{batch}") or out["parity"].get(key)
            out["rows"].append({
                "model": spec.key, "batch": batch, "backend": backend, "variant": variant,
                "valid": parity["passed"] if parity else True, **latency_stats(ts, batch, flops),
                "times_ms": [round(1e3 * t, 3) for t in ts]})
        out["ratios"] += _inference_ratios(spec.key, batch, times, cfg.methods)
    for runner in engines.values():
        runner.__exit__(None, None, None)
    return out


def _compiled_variants(modules: dict[str, nn.Module], merged_method: str, x: torch.Tensor, backend: str,
                       out: dict, batch: int, say: Progress) -> dict[str, Callable[[], Any]]:
    """torch.compile'd plain, merged and unmerged models (static shapes: one graph per batch size), compiled here
    and checked against their eager outputs on ``x`` (COMPILED_VS_EAGER), so a timed graph is known to be right."""
    from .tolerances import COMPILED_VS_EAGER

    torch.compiler.reset()  # a fresh cache per batch size: no recompile limit is reached across variants
    fns: dict[str, Callable[[], Any]] = {}
    for variant in COMPILED_VARIANTS:
        key = f"unmerged-{merged_method}" if variant == "unmerged" else variant
        say(f"batch {batch}: torch.compile (backend {backend}) of the {key} model")
        compiled = torch.compile(modules[key], backend=backend, dynamic=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            got, want = compiled(x).float(), modules[key](x).float()
        out.setdefault("compile_s", {})[f"b{batch}:{key}"] = time.perf_counter() - t0
        err = float((got - want).abs().max())
        bound = COMPILED_VS_EAGER.bound(float(want.abs().max()))
        out["parity"][f"compiled:{key}@b{batch}"] = {
            "passed": bool(math.isfinite(err) and err <= bound), "tolerance": COMPILED_VS_EAGER.name, "max_abs": err,
            "bound": bound, "reference": f"eager {key} ({x.dtype}, batch {batch})", "failures": []}
        fns[f"compiled:{key}"] = (lambda c=compiled: c(x))
    return fns


def _ort_sessions(spec: ModelSpec, cfg: BenchConfig, plain: nn.Module, merged: nn.Module, input_size: tuple,
                  threads: int, device: torch.device, work_dir: Path, inputs: dict, refs: dict, merged_method: str,
                  out: dict, say: Progress) -> dict[str, SessionRunner]:
    from .exports.onnx_export import export_onnx
    from .tolerances import ONNX_FP32

    sessions: dict[str, SessionRunner] = {}
    heads, hidden = _model_dims(plain)
    for variant, module in (("plain", plain), ("merged", merged)):
        path = work_dir / f"{spec.key}-{variant}.onnx"
        say(f"{spec.key}: exporting the {variant} model to ONNX")
        t0 = time.perf_counter()
        export_onnx(module.cpu(), path, input_size=input_size)
        module.to(device)
        out.setdefault("export_s", {})[variant] = time.perf_counter() - t0
        ref_name = "plain (PyTorch)" if variant == "plain" else f"unmerged {merged_method} (PyTorch)"
        runner = SessionRunner(path, threads, name=f"ort:{variant}", device=device)
        out["parity"][f"ort:{variant}"] = _parity(refs[variant], runner, inputs, ONNX_FP32, ref_name)
        sessions[f"ort:{variant}"] = runner
        if not cfg.ort_fused:
            continue
        fused_path = work_dir / f"{spec.key}-{variant}.ortfused.onnx"
        info = optimize_for_ort(path, fused_path, model_type=spec.ort_model_type, num_heads=heads,
                                hidden_size=hidden)
        out.setdefault("ort_optimizer", {})[variant] = info
        if not info["ok"]:
            out["notes"].append(f"ort-fused:{variant} skipped: the transformer optimizer failed ({info['reason']})")
            continue
        fused = SessionRunner(fused_path, threads, name=f"ort-fused:{variant}", device=device)
        parity = _parity(refs[variant], fused, inputs, ONNX_FP32, ref_name)
        out["parity"][f"ort-fused:{variant}"] = parity
        sessions[f"ort-fused:{variant}"] = fused
        if not parity["passed"]:
            out["notes"].append(f"ort-fused:{variant} fails parity ({'; '.join(parity['failures'])}): timed but "
                                "reported invalid")
    return sessions


def _tensorrt_runners(cfg: BenchConfig, work_dir: Path, spec: ModelSpec, max_batch: int, inputs: dict, refs: dict,
                      out: dict, say: Progress) -> dict[str, Any]:
    """TensorRT FP32 engines of the plain and merged ONNX, opened, when TensorRT and a GPU exist; else a note."""
    if cfg.tensorrt == "off":
        out["tensorrt"] = "skipped: disabled (--tensorrt off)"
        return {}
    from .exports.tensorrt import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        out["tensorrt"] = f"skipped: no CUDA/TensorRT ({reason})"
        return {}
    if not cfg.onnxruntime:
        out["tensorrt"] = "skipped: TensorRT engines are built from the ONNX exports (onnxruntime suite off)"
        return {}
    from .exports.tensorrt import TensorRTRunner, build_engine
    from .tolerances import TENSORRT_FP32

    runners: dict[str, Any] = {}
    for variant in ("plain", "merged"):
        onnx_path = work_dir / f"{spec.key}-{variant}.onnx"
        engine = work_dir / f"{spec.key}-{variant}.engine"
        say(f"{spec.key}: building a TensorRT FP32 engine ({variant})")
        build = build_engine(onnx_path, engine, batch=(1, max_batch, max(max_batch, 8)), precision="fp32",
                             timing_cache_path=work_dir / "trt.cache")
        runner = TensorRTRunner(engine, name=f"trt:{variant}").__enter__()
        out["parity"][f"trt:{variant}"] = _parity(refs[variant], runner, inputs, TENSORRT_FP32, variant)
        out.setdefault("tensorrt_build_s", {})[variant] = build.seconds
        runners[f"trt:{variant}"] = runner
    out["tensorrt"] = "measured (FP32 engines; timing includes host<->device copies of the batch)"
    return runners


def _inference_ratios(model: str, batch: int, times: dict[str, list[float]], methods: Sequence[str]) -> list[dict]:
    rows = []
    for backend in ("eager", "compiled", "ort", "ort-fused", "trt"):
        p, m = times.get(f"{backend}:plain"), times.get(f"{backend}:merged")
        if p and m:
            r = paired_ratio(m, p)
            rows.append({"model": model, "batch": batch, "ratio": "merged/plain", "backend": backend, "value": r,
                         "min_ratio": min_ratio(m, p), "target": MERGED_OVER_PLAIN_MAX,
                         "met": bool(r <= MERGED_OVER_PLAIN_MAX)})
    merged = times.get("eager:merged")
    for method in methods:
        u = times.get(f"eager:unmerged-{method}")
        if u and merged:
            rows.append({"model": model, "batch": batch, "ratio": f"unmerged-{method}/merged", "backend": "eager",
                         "value": paired_ratio(u, merged), "min_ratio": min_ratio(u, merged), "target": None,
                         "met": None})
    for backend in ("compiled", "ort", "ort-fused", "trt"):
        b = times.get(f"{backend}:merged")
        if b and merged:
            rows.append({"model": model, "batch": batch, "ratio": f"{backend}/eager (merged)", "backend": backend,
                         "value": paired_ratio(b, merged), "min_ratio": min_ratio(b, merged), "target": None,
                         "met": None})
    return rows


# ----------------------------------------------------------------------------------------------------- training


@dataclass
class _TrainSetup:
    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    trainable: int
    total: int
    amp: torch.dtype | None = None  # autocast dtype, as peftx's trainer (fp16 with a GradScaler)
    scaler: Any = None

    def _loss(self) -> torch.Tensor:
        from .evaluate import autocast

        with autocast(self.x.device, self.amp):
            logits = self.model(self.x)
        return nn.functional.cross_entropy(logits.float(), self.y)

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss()
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return float(loss.detach())

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._loss().backward()


def train_setup(spec: ModelSpec, method: str, *, batch: int, device: torch.device, seed: int = 0,
                fused_attention: bool = True, amp: str = "off") -> _TrainSetup:
    """The model, AdamW and a fixed batch for one training step of ``method`` ("full" = full fine-tuning, "frozen"
    = the backbone-only reference, see TRAIN_BASELINES).

    Mirrors peftx's trainer: timm's fused (SDPA) attention switched on for training, AdamW (lr 1e-4, weight decay
    0.05 on matrices) over the trainable tensors only, FP32 or ``amp`` autocast (fp16 with a GradScaler).
    """
    from .adapter import adapt, count_parameters
    from .methods import make_config

    torch.manual_seed(seed)
    model = spec.build(TRAIN_CLASSES, train=True)
    if method == "full":
        _freeze_all_but(model, True)
        trainable = total = sum(p.numel() for p in model.parameters())
    elif method == "frozen":
        _freeze_all_but(model, False)
        head = model.get_classifier()
        head.requires_grad_(True)
        # The input image needs no gradient, so without this backward would stop at the head.
        model.patch_embed.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in head.parameters())
    else:
        adapt(model, make_config(method), base_fingerprint="benchmark (not computed)")
        trainable, total = count_parameters(model)
    if fused_attention:
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4)
    size = model.patch_embed.img_size if hasattr(model, "patch_embed") else (224, 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *size, generator=gen).to(device)
    y = torch.randint(0, TRAIN_CLASSES, (batch,), generator=gen).to(device)
    from .evaluate import resolve_amp

    amp_dtype = resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return _TrainSetup(method, model, optimizer, x, y, trainable, total, amp_dtype, scaler)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def delta_cost(model: nn.Module, *, reps: int = 5) -> dict[str, Any] | None:
    """Milliseconds to build every adapted layer's weight-side tensors (forward) and back-propagate into them.

    This is the per-step work that does not depend on the batch, done the way training does it: RLRR's in-place
    W' = W ⊙ (1 + s_row s_colᵀ) and the reduction of dL/dW' to its two vectors (the dL/dW' GEMM itself is left
    out: full fine-tuning does it too; a copy of a fixed random dL/dW' stands in for its output); AOFT's generator
    and factors; LoRA's (zero-padded) factors. Upstream gradients are fixed random tensors.
    """
    from .adapter import adapter_modules
    from .methods import AdapterLinear, LowRankLinear, RLRRLinear
    from .methods.rlrr import rescale_vector_grads

    layers = [m for _, m in adapter_modules(model) if isinstance(m, AdapterLinear)]
    if not layers:
        return None
    low_rank = [m for m in layers if isinstance(m, LowRankLinear)]
    rlrr = [m for m in layers if isinstance(m, RLRRLinear)]

    def build() -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        for m in low_rank:
            outs.extend(m.factors())
        with torch.no_grad():
            for m in rlrr:
                outs.append(m.merge_weight(m.base_layer.weight))
        return outs

    outs = build()
    sync = _sync(layers[0].base_layer.weight.device)  # CUDA kernels run asynchronously: time them, not their launch
    grads = [torch.randn_like(t) for t in outs if t.requires_grad]
    rlrr_grads = [torch.randn_like(m.base_layer.weight) for m in rlrr]
    params = [p for m in layers for p in m.adapter_parameters()]
    fwd, total = [], []
    for _ in range(reps + 1):
        for p in params:
            p.grad = None
        sync()
        t0 = time.perf_counter()
        outs = build()
        sync()
        t1 = time.perf_counter()
        if grads:
            torch.autograd.backward([t for t in outs if t.requires_grad], grads)
        with torch.no_grad():
            for m, g in zip(rlrr, rlrr_grads):
                rescale_vector_grads(g.clone(), m.base_layer.weight, m.s_row, m.s_col, m.col_groups)
        sync()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        total.append(t2 - t0)
    for p in params:
        p.grad = None
    return {"layers": len(layers), "forward_ms": 1e3 * float(np.median(fwd[1:])),
            "forward_backward_ms": 1e3 * float(np.median(total[1:]))}


def _rss_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_worker(spec: ModelSpec, method: str, batch: int, steps: int, threads: int, device: str,
                  seed: int, amp: str = "off") -> dict[str, Any]:
    """Runs in a fresh process: peak memory (and an isolated step time) of ``steps`` training steps of ``method``."""
    import resource

    torch.set_num_threads(threads)
    dev = torch.device(device)
    setup = train_setup(spec, method, batch=batch, device=dev, seed=seed, amp=amp)
    out: dict[str, Any] = {"method": method}
    params = [p for p in setup.model.parameters() if p.requires_grad]
    out["param_bytes"] = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base_kib = _rss_kib("VmRSS")
        reset = _reset_peak_rss()
    times = []
    for _ in range(max(1, steps) + 1):
        t0 = time.perf_counter()
        setup.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
        out.update(memory_kind="torch.cuda.max_memory_allocated", peak_bytes=peak, baseline_bytes=base,
                   peak_delta_bytes=peak - base)
    else:
        hwm = _rss_kib("VmHWM") if reset else None
        if hwm is None:  # no /proc reset: ru_maxrss covers set-up too (an upper bound)
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mmap = os.environ.get("MALLOC_MMAP_THRESHOLD_") == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
        kind = "peak RSS, reset after set-up" if reset else "ru_maxrss (includes set-up)"
        kind += ", own process" + (", malloc mmap threshold 64 KiB" if mmap else "")
        out.update(memory_kind=kind,
                   peak_bytes=hwm * 1024, baseline_bytes=(base_kib or 0) * 1024,
                   peak_delta_bytes=(hwm - (base_kib or 0)) * 1024)
    out["optimizer_state_bytes"] = optimizer_state_bytes(setup.optimizer)
    out["grad_bytes"] = sum(p.numel() * p.element_size() for p in params)
    out["isolated_step_s"] = times[1:] or times  # the first step allocates the optimizer state: not timed
    return out


# glibc malloc in the memory worker: every block >= 64 KiB is its own mmap, returned to the OS when freed, and the
# threshold never adapts. RSS then follows the live tensors (repeat runs agree to ~0.1 MiB instead of ~20 MiB).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _run_memory_worker(isolate: bool, spec: ModelSpec, *args: Any) -> dict[str, Any]:
    """:func:`memory_worker` in a fresh Python process (``isolate``), so no other method's peak is in its RSS.

    A plain subprocess (``python -c``) rather than multiprocessing: spawn would re-import the caller's __main__.
    Arguments go in and the result comes back as JSON files.
    """
    if not isolate:
        return memory_worker(spec, *args)
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="peftx-bench-worker-") as tmp:
        src, dst = Path(tmp) / "args.json", Path(tmp) / "result.json"
        src.write_text(json.dumps({"spec": asdict(spec), "args": list(args)}))
        code = "from peftx.bench import _memory_worker_main; _memory_worker_main()"
        proc = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True,
                              env={**os.environ, **MALLOC_ENV})
        if proc.returncode != 0 or not dst.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the memory worker for {args[0]!r} failed (exit {proc.returncode}): {tail[0]}")
        return json.loads(dst.read_text())


def _memory_worker_main() -> None:
    """Entry point of the isolated worker: argv = [args.json, result.json]."""
    import json
    import sys

    data = json.loads(Path(sys.argv[1]).read_text())
    spec_d = data["spec"]
    spec_d["kwargs"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in spec_d["kwargs"])
    result = memory_worker(ModelSpec(**spec_d), *data["args"])
    Path(sys.argv[2]).write_text(json.dumps(result))


def bench_profile(spec: ModelSpec, cfg: BenchConfig, *, device: torch.device, progress: Progress) -> dict[str, Any]:
    """torch.profiler over a few training steps of each method (same backbone and batch as the training suite)."""
    spec = replace(spec, train_img_size=cfg.train_img_size or spec.train_img_size)
    out: dict[str, Any] = {"model": spec.key, "label": spec.label, "batch": cfg.train_batch, "profiles": {}}
    for m in cfg.train_methods:
        progress(f"{spec.key} profile: {m}")
        setup = train_setup(spec, m, batch=cfg.train_batch, device=device, seed=cfg.seed, amp=cfg.train_amp)
        out["img_size"] = list(setup.x.shape[-2:])
        out["profiles"][m] = profile_step(setup.step, steps=cfg.profile_steps, cuda=device.type == "cuda")
        del setup
    return out


def bench_training(spec: ModelSpec, cfg: BenchConfig, *, threads: int, device: torch.device,
                   progress: Progress) -> dict[str, Any]:
    """Full fine-tuning vs each adapter on one backbone and batch: step time, FLOPs, memory, optimizer state."""
    say = progress
    methods = list(cfg.train_methods)
    spec = replace(spec, train_img_size=cfg.train_img_size or spec.train_img_size)
    say(f"{spec.key} training: building {', '.join(methods)}")
    setups = {m: train_setup(spec, m, batch=cfg.train_batch, device=device, seed=cfg.seed, amp=cfg.train_amp)
              for m in methods}
    any_setup = next(iter(setups.values()))
    precision = "FP32" if cfg.train_amp == "off" else f"{cfg.train_amp} autocast" + (
        " + GradScaler" if cfg.train_amp == "fp16" else "")
    out: dict[str, Any] = {"model": spec.key, "label": spec.label, "batch": cfg.train_batch,
                           "img_size": list(any_setup.x.shape[-2:]), "rows": [], "ratios": [],
                           "settings": f"{precision}, timm fused (SDPA) attention on as in peftx's trainer, AdamW "
                                       "(torch default implementation) over the trainable tensors only"}
    step_flops = {m: count_step_flops(s.forward_backward, cfg.train_batch) for m, s in setups.items()}
    say(f"{spec.key} training: timing {len(methods)} methods interleaved")
    timing = timed_rounds({m: s.step for m, s in setups.items()}, warmup=cfg.train_warmup,
                          min_rounds=cfg.train_rounds, max_rounds=max(cfg.train_rounds, 20),
                          budget_s=cfg.train_budget_s, sync=_sync(device), seed=cfg.seed,
                          guard=_guard(cfg, threads, device))
    times = timing.times
    out["timing"] = timing.to_json()
    deltas = {m: delta_cost(s.model, reps=cfg.delta_reps) for m, s in setups.items() if m not in TRAIN_BASELINES}
    opt_state = {m: optimizer_state_bytes(s.optimizer) for m, s in setups.items()}
    info = {m: (s.trainable, s.total) for m, s in setups.items()}
    del setups, any_setup
    memory = {}
    for m in methods:
        say(f"{spec.key} training: peak memory of {m} ({'own process' if cfg.isolate_memory else 'in process'})")
        memory[m] = _run_memory_worker(cfg.isolate_memory, spec, m, cfg.train_batch, cfg.memory_steps, threads,
                                       str(device), cfg.seed, cfg.train_amp)
    for m in methods:
        st = latency_stats(times[m], cfg.train_batch, None)
        mem = memory[m]
        out["rows"].append({
            "model": spec.key, "method": m, "trainable_params": info[m][0], "total_params": info[m][1],
            "step_ms_p50": st["p50_ms"], "step_ms_p90": st["p90_ms"], "n": st["n"], "images_per_s": st["images_per_s"],
            "step_gflop_per_image": step_flops[m] / 1e9,
            "achieved_gflops": step_flops[m] * cfg.train_batch / (st["p50_ms"] / 1e3) / 1e9,
            "peak_bytes": mem["peak_bytes"], "peak_delta_bytes": mem["peak_delta_bytes"],
            "memory_kind": mem["memory_kind"], "optimizer_state_bytes": opt_state[m],
            "grad_bytes": mem["grad_bytes"],
            # slower than step_ms: the worker's malloc mmaps every large block, so each step page-faults afresh
            "isolated_step_ms_mmap_malloc": 1e3 * float(np.median(mem["isolated_step_s"])),
            "delta_cost": deltas.get(m), "times_ms": [round(1e3 * t, 2) for t in times[m]]})
    if "full" in times:
        full_mem = memory["full"]["peak_delta_bytes"]
        for m in methods:
            if m == "full":
                continue
            r = paired_ratio(times[m], times["full"])
            target = m in ("rlrr", "aoft")
            out["ratios"].append({"model": spec.key, "method": m, "step_time_vs_full": r,
                                  "step_time_vs_full_of_mins": min_ratio(times[m], times["full"]),
                                  "step_time_vs_frozen": (paired_ratio(times[m], times["frozen"])
                                                          if "frozen" in times else None),
                                  "peak_memory_vs_full": memory[m]["peak_delta_bytes"] / max(full_mem, 1),
                                  "targeted": target,
                                  "step_time_met": bool(r <= 1.0) if target else None,
                                  "memory_met": bool(memory[m]["peak_delta_bytes"] < full_mem) if target else None})
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
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
            "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                         "share": e.self_cpu_time_total / total_self, "calls_per_step": e.count / steps}
                        for e in rows]}


# ----------------------------------------------------------------------------------------------------- export


def bench_export(spec: ModelSpec, cfg: BenchConfig, *, threads: int, work_dir: Path,
                 progress: Progress) -> dict[str, Any]:
    """Wall time of merge (each method), ONNX export, onnxslim simplification and parity, for the merged model."""
    from .adapter import merge_and_unload
    from .backbones import data_config
    from .data import real_images
    from .exports.onnx_export import export_onnx, op_histogram
    from .exports.parity import make_input_sets
    from .exports.runners import OnnxRuntimeRunner
    from .exports.simplify import simplify_onnx
    from .tolerances import ONNX_FP32

    say = progress
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    plain = spec.build(NUM_CLASSES)
    build_s = time.perf_counter() - t0
    dcfg = data_config(plain)
    input_size = tuple(int(v) for v in dcfg["input_size"])
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
    expected = _torch_outputs(reference, inputs, torch.device("cpu"))
    candidate = slim_path if slim.applied else path
    parity = _parity(expected, OnnxRuntimeRunner(candidate), inputs, ONNX_FP32, f"unmerged {method} (PyTorch)")
    steps["parity"] = time.perf_counter() - t0
    out.update(method=method, steps=steps, total_s=sum(steps.values()),
               merge_plus_export_s=steps["merge"] + steps["onnx_export"], parity=parity,
               simplify=slim.to_json(), onnx_mb=path.stat().st_size / 2 ** 20,
               nodes=sum(op_histogram(path).values()), target_s=EXPORT_SECONDS_MAX,
               met=bool(steps["merge"] + steps["onnx_export"] < EXPORT_SECONDS_MAX))
    if cfg.export_bundle:
        from .exports.bundle import write_bundle

        say(f"{spec.key} export: the full bundle writer (export, FP16, every parity check)")
        t0 = time.perf_counter()
        report = write_bundle(reference, merged, work_dir / f"bundle-{spec.key}", input_size=input_size,
                              data_config=dcfg, class_names=[str(i) for i in range(NUM_CLASSES)],
                              provenance={"benchmark": "peftx bench"}, images=images, tensorrt="auto", force=True,
                              progress=None)
        out["bundle"] = {"wall_s": time.perf_counter() - t0, "status": report.status, "timings": report.timings}
    return out


# ----------------------------------------------------------------------------------------------------- driver


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
            results["inference"] = [bench_inference(cfg.spec(k), cfg, threads=threads, device=device,
                                                    work_dir=work, progress=say) for k in cfg.models]
        if "training" in cfg.suites:
            results["training"] = [bench_training(cfg.spec(k), cfg, threads=threads, device=device, progress=say)
                                   for k in cfg.train_models]
        if "profile" in cfg.suites:
            results["profile"] = [bench_profile(cfg.spec(k), cfg, device=device, progress=say)
                                  for k in cfg.train_models]
        if "export" in cfg.suites:
            results["export"] = [bench_export(cfg.spec(k), cfg, threads=threads, work_dir=work, progress=say)
                                 for k in cfg.export_models]
        say("matmul peak again (end of run)")
        results["peak_end"] = [matmul_peak(cfg.matmul_n, reps=cfg.matmul_reps, device=device,
                                           dtype=DTYPES[cfg.dtype])]
        if device.type == "cpu":
            results["contention_end"] = contention_probe(threads)
    results["environment"]["loadavg_end"] = _loadavg()
    results["wall_s"] = time.perf_counter() - started
    finalize(results)
    return results


def finalize(results: dict[str, Any]) -> dict[str, Any]:
    """Peak = best torch sgemm of the run (start/end); add % of peak to every inference row; evaluate targets."""
    torch_peaks = [p["gflops"] for p in results.get("peak_start", []) + results.get("peak_end", [])
                   if p["backend"].startswith("torch")]
    all_peaks = [p for p in results.get("peak_start", []) + results.get("peak_end", [])]
    peak = max(torch_peaks) if torch_peaks else None
    dtypes = sorted({p["dtype"] for p in all_peaks if p["backend"].startswith("torch")})
    results["peak"] = {"gflops": peak, "basis": f"best torch.mm {'/'.join(dtypes)} GEMM of this run (start and end)",
                       "all": all_peaks}
    for model in results.get("inference", []):
        for row in model["rows"]:
            row["pct_peak"] = 100.0 * row["gflops"] / peak if peak and row.get("gflops") else None
    results["targets"] = evaluate_targets(results)
    return results


def evaluate_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every target the issue sets, with the measured value and met / not met (None: not measured this run)."""
    targets: list[dict[str, Any]] = []
    for model in results.get("inference", []):
        for r in model["ratios"]:
            if r["ratio"] == "merged/plain":
                targets.append({"target": f"merged <= {MERGED_OVER_PLAIN_MAX}x plain latency",
                                "where": f"{r['model']} b{r['batch']} {r['backend']}",
                                "value": f"{r['value']:.3f}x", "met": r["met"]})
        if model["model"] != "vit_b16":
            continue
        rows = {(row["batch"], row["backend"], row["variant"]): row for row in model["rows"]}
        for batch in sorted({row["batch"] for row in model["rows"]}):
            ort_rows = [rows[k] for k in ((batch, "ort", "merged"), (batch, "ort-fused", "merged"))
                        if k in rows and rows[k]["valid"]]
            eager = rows.get((batch, "eager", "merged"))
            if not ort_rows:
                continue
            best = min(ort_rows, key=lambda row: row["p50_ms"])
            pct = best.get("pct_peak")
            pct_min = 100 * ORT_PEAK_FRACTION_MIN
            targets.append({"target": f"ONNX Runtime FP32 ViT-B/16 >= {pct_min:.0f}% of matmul peak",
                            "where": f"b{batch} {best['backend']}",
                            "value": f"{pct:.1f}% ({best['gflops']:.0f} GFLOP/s)" if pct is not None else "n/a",
                            "met": bool(pct is not None and pct >= 100 * ORT_PEAK_FRACTION_MIN)})
            if eager:
                targets.append({"target": "ONNX Runtime faster than PyTorch eager (merged ViT-B/16)",
                                "where": f"b{batch} {best['backend']}",
                                "value": f"{best['p50_ms']:.1f} ms vs {eager['p50_ms']:.1f} ms",
                                "met": bool(best["p50_ms"] < eager["p50_ms"])})
    for model in results.get("training", []):
        for r in model["ratios"]:
            if not r["targeted"]:
                continue
            targets.append({"target": "step time <= full fine-tuning", "where": f"{r['model']} {r['method']}",
                            "value": f"{r['step_time_vs_full']:.3f}x", "met": r["step_time_met"]})
            targets.append({"target": "peak training memory below full fine-tuning",
                            "where": f"{r['model']} {r['method']}", "value": f"{r['peak_memory_vs_full']:.3f}x",
                            "met": r["memory_met"]})
    for model in results.get("export", []):
        targets.append({"target": f"merge + ONNX export < {EXPORT_SECONDS_MAX:.0f} s",
                        "where": model["model"], "value": f"{model['merge_plus_export_s']:.1f} s", "met": model["met"]})
    return targets


def _config_json(cfg: BenchConfig) -> dict[str, Any]:
    d = asdict(replace(cfg, specs={}))
    d["specs"] = {k: asdict(v) for k, v in cfg.specs.items()}
    return d


@contextlib.contextmanager
def _work_dir(path: str | None) -> Iterator[Path]:
    if path is not None:
        from .fsutil import ensure_dir

        yield ensure_dir(Path(path))
        return
    with tempfile.TemporaryDirectory(prefix="peftx-bench-") as tmp:
        yield Path(tmp)


# ----------------------------------------------------------------------------------------------------- output


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec)


def _mib(b: float | None) -> str:
    return "—" if b is None else f"{b / 2 ** 20:,.0f}"


def _met(v: bool | None) -> str:
    return "—" if v is None else ("met" if v else "NOT met")


def result_tables(results: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) for every table of the report; plain strings, for rich or text output."""
    tables = []
    env = results.get("environment", {})
    peak = results.get("peak", {})
    rows = [[p["backend"], f"{p['n']}^3 {p['dtype']}", _fmt(p["gflops"], ".0f"), _fmt(p["median_gflops"], ".0f"),
             when] for when in ("start", "end") for p in results.get(f"peak_{when}", [])]
    for when in ("start", "end"):
        c = results.get(f"contention_{when}")
        if c:
            rows.append([f"contention probe: {c['op']}", f"x{c['ratio']:.1f} vs 1 thread",
                         "CONTENDED" if c["contended"] else "ok", f"loadavg {c['loadavg']}", when])
    tables.append((f"Matmul peak — {env.get('cpu', '?')}, {env.get('thread_settings', '')}; "
                   f"peak used = {_fmt(peak.get('gflops'), '.0f')} GFLOP/s ({peak.get('basis', '')})",
                   ["backend", "size", "best GFLOP/s", "median GFLOP/s", "when"], rows))
    for model in results.get("inference", []):
        rows = []
        for r in model["rows"]:
            name = r["variant"] + ("" if r["valid"] else " (INVALID: parity)")
            rows.append([str(r["batch"]), r["backend"], name, _fmt(r["p50_ms"]), _fmt(r["p90_ms"]), _fmt(r["p99_ms"]),
                         str(r["n"]), _fmt(r["images_per_s"]), _fmt(r["gflops"], ".0f"), _fmt(r.get("pct_peak"))])
        tables.append((f"Inference — {model['label']} {'x'.join(map(str, model['input_size'][1:]))} px, "
                       f"{model['gflop_per_image']:.2f} GFLOP/img (counted); merged = {model['merged_method']}",
                       ["batch", "backend", "variant", "p50 ms", "p90 ms", "p99 ms", "n", "img/s", "GFLOP/s",
                        "% peak"], rows))
        rows = [[str(r["batch"]), r["ratio"], r["backend"], _fmt(r["value"], ".3f"), _fmt(r["min_ratio"], ".3f"),
                 "—" if r["target"] is None else f"<= {r['target']}", _met(r["met"])] for r in model["ratios"]]
        tables.append((f"Ratios — {model['model']} (median of per-round ratios; 'of mins' = best case / best case)",
                       ["batch", "ratio", "backend", "median", "of mins", "target", "verdict"], rows))
        rows = [[k, "pass" if v["passed"] else "FAIL", f"{v['max_abs']:.2e}", f"{v['bound']:.1e} ({v['tolerance']})",
                 v["reference"]] for k, v in model["parity"].items()]
        rows += [[f"ort-optimizer:{k}", "ok" if v["ok"] else "failed",
                  ", ".join(f"{op} {n}" for op, n in v.get("fused_ops", {}).items()) or v.get("reason", "no fusion"),
                  "", ""] for k, v in model.get("ort_optimizer", {}).items()]
        rows += [["tensorrt", model.get("tensorrt", ""), "", "", ""]]
        rows += [[f"timing b{b}", f"{t['rounds']} rounds kept, {t['discarded_rounds']} discarded (contention)"
                  + (" — CONTENDED: too few clean rounds" if t["contended"] else ""), "", "", ""]
                 for b, t in model.get("timing", {}).items()]
        rows += [["note", n, "", "", ""] for n in model.get("notes", [])]
        tables.append((f"Parity / backend status — {model['model']}", ["what", "verdict", "max |Δ|", "bound",
                                                                       "reference"], rows))
    for model in results.get("training", []):
        rows = []
        for r in model["rows"]:
            d = r.get("delta_cost") or {}
            rows.append([r["method"], f"{r['trainable_params']:,}", _fmt(r["step_ms_p50"], ".0f"),
                         _fmt(r["step_ms_p90"], ".0f"), _fmt(r["images_per_s"]), _fmt(r["step_gflop_per_image"], ".2f"),
                         _mib(r["peak_delta_bytes"]), _mib(r["peak_bytes"]), _mib(r["optimizer_state_bytes"]),
                         _fmt(d.get("forward_backward_ms"), ".1f")])
        t = model.get("timing", {})
        rounds = (f"{t.get('rounds')} rounds kept, {t.get('discarded_rounds')} discarded"
                  + (", CONTENDED" if t.get("contended") else "")) if t else ""
        tables.append((f"Training — {model['label']}, {'x'.join(map(str, model['img_size']))} px, batch "
                       f"{model['batch']} ({model['settings']}; memory: {model['rows'][0]['memory_kind']}; {rounds})",
                       ["method", "trainable", "step ms p50", "p90", "img/s", "fwd+bwd GFLOP/img",
                        "peak Δ MiB", "peak MiB", "AdamW state MiB", "delta build f+b ms"], rows))
        rows = [[r["method"], _fmt(r["step_time_vs_full"], ".3f"), _fmt(r["step_time_vs_full_of_mins"], ".3f"),
                 _fmt(r["peak_memory_vs_full"], ".3f"), _met(r["step_time_met"]), _met(r["memory_met"]),
                 _fmt(r.get("step_time_vs_frozen"), ".3f")]
                for r in model["ratios"]]
        tables.append((f"Training ratios vs full fine-tuning — {model['model']} (step time: median of per-round "
                       "ratios, and best / best; frozen = backbone-only reference)",
                       ["method", "step time", "of mins", "peak memory", "step target", "memory target",
                        "step / frozen"], rows))
    for model in results.get("profile", []):
        for method, prof in model["profiles"].items():
            rows = [[o["op"], _fmt(o["self_ms_per_step"], ".1f"), _fmt(100 * o["share"], ".1f"),
                     _fmt(o["calls_per_step"], ".0f")] for o in prof["top_ops"]]
            tables.append((f"Profile — {model['model']} {method}, {'x'.join(map(str, model['img_size']))} px batch "
                           f"{model['batch']}: {prof['wall_ms_per_step']:.0f} ms/step under the profiler",
                           ["op", "self ms/step", "% self CPU", "calls/step"], rows))
    for model in results.get("export", []):
        s = model["steps"]
        rows = [[model["model"], model["method"], _fmt(s["merge"], ".2f"), _fmt(s["onnx_export"], ".1f"),
                 _fmt(s["simplify"], ".1f"), _fmt(s["parity"], ".1f"), _fmt(model["total_s"], ".1f"),
                 "pass" if model["parity"]["passed"] else "FAIL", f"{model['parity']['max_abs']:.1e}",
                 _fmt(model["onnx_mb"], ".0f"),
                 ", ".join(f"{k} {v:.2f}" for k, v in model["merge_s"].items())]]
        if "bundle" in model:
            rows[0].append(f"{model['bundle']['wall_s']:.1f} ({model['bundle']['status']})")
        cols = ["model", "method", "merge s", "export s", "simplify s", "parity s", "total s", "parity", "max |Δ|",
                "ONNX MiB", "merge s per method"] + (["bundle s"] if "bundle" in model else [])
        tables.append((f"Export — {model['label']}", cols, rows))
    rows = [[t["target"], t["where"], t["value"], _met(t["met"])] for t in results.get("targets", [])]
    if rows:
        tables.append(("Targets", ["target", "where", "measured", "verdict"], rows))
    return tables


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``bench.json`` and ``bench.png`` into ``out_dir`` (atomically); returns their paths."""
    import json

    from .fsutil import atomic_path, ensure_dir, write_text_atomic

    out = ensure_dir(Path(out_dir))
    paths = {"json": write_text_atomic(out / "bench.json", json.dumps(_jsonable(results), indent=2) + "\n")}
    with atomic_path(out / "bench.png") as tmp:
        if plot_results(results, tmp):
            paths["png"] = out / "bench.png"
    if "png" not in paths:
        (out / "bench.png").unlink(missing_ok=True)
    return paths


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def plot_results(results: Mapping[str, Any], path: str | Path) -> bool:
    """A PNG: inference p50 latency per variant (one panel per model x batch), training step time and peak memory.

    Returns False when there is nothing to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(m, b) for m in results.get("inference", []) for b in sorted({r["batch"] for r in m["rows"]})]
    train = results.get("training", [])
    n = len(panels) + 2 * len(train)
    if n == 0:
        return False
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    colors = {"eager": "tab:blue", "ort": "tab:orange", "ort-fused": "tab:green", "trt": "tab:red"}
    i = 0
    for model, batch in panels:
        ax = axes[i]
        i += 1
        rows = [r for r in model["rows"] if r["batch"] == batch]
        labels = [f"{r['backend']}\n{r['variant']}" for r in rows]
        ax.bar(range(len(rows)), [r["p50_ms"] for r in rows], color=[colors.get(r["backend"], "grey") for r in rows],
               hatch=None)
        for j, r in enumerate(rows):
            if not r["valid"]:
                ax.text(j, r["p50_ms"], "invalid", ha="center", va="bottom", fontsize=7, color="red")
            pct = r.get("pct_peak")
            if pct is not None:
                ax.text(j, r["p50_ms"] / 2, f"{pct:.0f}%", ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=6.5)
        ax.set(ylabel="p50 latency (ms)", title=f"{model['model']} batch {batch} (label: % of matmul peak)")
        ax.grid(axis="y", alpha=0.3)
    for model in train:
        rows = model["rows"]
        names = [r["method"] for r in rows]
        ax = axes[i]
        i += 1
        ax.bar(names, [r["step_ms_p50"] for r in rows], color="tab:purple")
        ax.set(ylabel="step time p50 (ms)", title=f"{model['model']} training step, batch {model['batch']}")
        ax.grid(axis="y", alpha=0.3)
        ax = axes[i]
        i += 1
        ax.bar(names, [r["peak_delta_bytes"] / 2 ** 20 for r in rows], color="tab:brown", label="peak Δ")
        ax.bar(names, [r["optimizer_state_bytes"] / 2 ** 20 for r in rows], color="tab:gray", label="AdamW state")
        ax.set(ylabel="MiB", title=f"{model['model']} training peak memory")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[i:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return True
