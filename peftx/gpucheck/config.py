"""What one GPU-check run does: :class:`GpuCheckConfig` and its validation."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from peftx.errors import BackendUnavailableError, UsageError
from peftx.methods import METHOD_NAMES

STEPS = ("tests", "train", "parity", "bench")
DEFAULT_OUT = Path("gpu-check-results")
JSON_FILE = "gpu-check.json"
LOG_FILE = "gpu-check.log"
JUNIT_FILE = "gpu-tests.xml"
BENCH_DIR = "bench"


@dataclass
class GpuCheckConfig:
    """One run of the GPU check. ``None`` fields are resolved at run time (see :meth:`resolved_*`)."""

    device: str = "auto"  # auto | cuda | cpu (cpu: the CI mode, with --quick)
    quick: bool = False  # tiny random-weight models and a few steps: under a minute on 2 CPU cores
    out: str | None = None  # None: $OUT when set, else ./gpu-check-results
    steps: tuple[str, ...] = STEPS
    weights: str | None = None  # the fp16 demo copy; None: gpu-check-assets/vit_s14_fp16.safetensors if present
    reference: str | None = None  # a recorded CPU reference (JSON); unusable or missing entries are run here
    record_reference: str | None = None  # write the CPU reference runs to this file (and skip the AMP runs)
    methods: tuple[str, ...] | None = None  # None: every registered method (peftx.methods.METHOD_NAMES)
    tests_dir: str = "tests"
    work_dir: str | None = None  # training runs and temporary files (None: a temporary directory)
    step_timeout_s: float = 420.0  # per subprocess (pytest, peftx bench)
    # The whole run's wall-time budget (None: none). The device tool kills a command at its limit and keeps only what
    # is on disk then; with a limit a little under it, the run stops itself first: steps, training runs and models
    # not started in time are recorded as not run (failed checks), and the subprocesses get what time is left.
    time_limit_s: float | None = None

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"device: {self.device!r} is not a device", "use auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                "device 'cuda' requested but CUDA is not available",
                "run on the GPU machine, or use --device cpu --quick",
            )
        bad = [s for s in self.steps if s not in STEPS]
        if bad or not self.steps:
            raise UsageError(f"unknown step(s) {bad or '(none)'}", f"choose from {', '.join(STEPS)}")

        bad = [m for m in self.methods or () if m not in METHOD_NAMES]
        if bad:
            raise UsageError(f"unknown method(s) {bad}", f"choose from {', '.join(METHOD_NAMES)}")
        if self.record_reference and (self.quick or self.resolved_device() != "cpu"):
            raise UsageError(
                "--record-reference records the full-size CPU reference", "run it with --device cpu and without --quick"
            )
        if self.step_timeout_s <= 0:
            raise UsageError(f"step_timeout_s: {self.step_timeout_s} must be positive")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise UsageError(f"time_limit_s: {self.time_limit_s} must be positive")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_out(self) -> Path:
        if self.out:
            return Path(self.out)
        env = os.environ.get("OUT")
        return Path(env) if env else DEFAULT_OUT

    def resolved_methods(self) -> tuple[str, ...]:

        return tuple(self.methods) if self.methods else tuple(METHOD_NAMES)
