"""The GPU check (issue 13): everything CUDA-specific, checked and measured in one unattended run.

One call on a bare GPU machine runs, in order, the tests marked ``gpu``; a short demo training run of every method
at bf16 and at fp16 + GradScaler, against a CPU FP32 run; merged-vs-unmerged parity on the device in FP32, bf16 and
fp16; and ``peftx bench`` on the device. It writes ``gpu-check.json`` (every figure and verdict) and
``gpu-check.log`` into the output directory. ``--device cpu --quick`` runs the same code on tiny random models in
CI, so it cannot rot. Entry points: :func:`run_gpu_check`, :func:`prepare_assets`; CLI ``peftx gpu-check``;
``scripts/gpu-check.sh`` installs peftx on a bare machine and calls it.
"""

from __future__ import annotations

from .assets import ASSET_DIR, ASSET_FILE, prepare_assets
from .config import STEPS, GpuCheckConfig
from .report import summary_tables
from .run import NEEDS_REAL_WEIGHTS, run_gpu_check

__all__ = [
    "ASSET_DIR",
    "ASSET_FILE",
    "GpuCheckConfig",
    "NEEDS_REAL_WEIGHTS",
    "STEPS",
    "prepare_assets",
    "run_gpu_check",
    "summary_tables",
]
