"""The run's shared context, its log, check records and the JSON file (rewritten after every step)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftx.fsutil import ensure_dir, write_text_atomic

from .._util import jsonable
from .config import JSON_FILE, LOG_FILE, GpuCheckConfig

Say = Callable[[str], None]


@dataclass
class Weights:
    """The backbone weights the training and parity steps use: a file (or None: random init) and its description."""

    path: Path | None
    info: dict[str, Any]

    @property
    def real(self) -> bool:
        return self.info.get("kind") == "real"


@dataclass
class Context:
    cfg: GpuCheckConfig
    device: str
    out: Path
    work: Path
    weights: Weights
    log_path: Path
    progress: Say | None = None
    started: float = field(default_factory=time.perf_counter)

    def say(self, message: str) -> None:
        """One progress line: to the caller's callback and, time-stamped, to the log."""
        self.log(f"[{time.perf_counter() - self.started:7.1f} s] {message}")
        if self.progress is not None:
            self.progress(message)

    def remaining_s(self) -> float | None:
        """Seconds left of the run's time limit (None: no limit)."""
        limit = self.cfg.time_limit_s
        return None if limit is None else limit - (time.perf_counter() - self.started)

    def out_of_time(self, reserve_s: float = 0.0) -> bool:
        """True when less than ``reserve_s`` of the time limit is left: the next piece of work is not started."""
        left = self.remaining_s()
        return left is not None and left <= reserve_s

    def subprocess_timeout(self) -> float:
        """A subprocess's timeout: the per-step limit, cut to what is left of the run's time limit."""
        left = self.remaining_s()
        return self.cfg.step_timeout_s if left is None else max(1.0, min(self.cfg.step_timeout_s, left))

    def not_run(self, name: str) -> dict[str, Any]:
        """The failed check of a piece of work the time limit left no time for."""
        return check(name, False, f"not run: the --time-limit of {self.cfg.time_limit_s:.0f} s was spent")

    def log(self, text: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")


def check(name: str, ok: bool | None, detail: str) -> dict[str, Any]:
    """One verdict: ok True / False, or None when it could not apply here (e.g. fp16 autocast on CPU)."""
    return {"name": name, "ok": ok, "detail": detail}


def error_text(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {message.splitlines()[0][:300]}"


def run_logged(cmd: list[str], ctx: Context, *, timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``, appending its stdout+stderr to the log as it goes; returns rc, seconds and the output's tail."""
    ctx.log(f"$ {' '.join(cmd)}")
    t0 = time.perf_counter()
    with open(ctx.log_path, "a", encoding="utf-8") as fh:
        # Its own process group, so a timeout also ends what it started (the bench's memory workers), not just it.
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
        try:
            rc, timed_out = proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, timed_out = None, True
    seconds = time.perf_counter() - t0
    if timed_out:
        ctx.log(f"(killed after {timeout_s:.0f} s)")
    return {"rc": rc, "timed_out": timed_out, "seconds": seconds}


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "device": device,
        "executable": sys.executable,
    }
    for mod in ("timm", "onnx", "onnxruntime", "safetensors", "numpy", "typer"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is a fact to report
            info[mod] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    info["source"] = source_identity()
    return info


def source_identity(root: Path | None = None) -> dict[str, Any]:
    """Which code ran: the git commit when the tree has one, and a digest of every tracked kind of source file
    (the copied tree on a GPU machine has no .git; the same digest can be computed from a checkout)."""
    root = root or Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    files = sorted(
        p
        for d in ("peftx", "cli", "exports", "tests")
        for p in (root / d).rglob("*.py")
        if "__pycache__" not in p.parts
    )
    for p in files:
        digest.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    commit = None
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": commit, "python_files": len(files), "sha256": digest.hexdigest()}


def write_json(out: Path, results: dict[str, Any]) -> Path:
    ensure_dir(out)
    return write_text_atomic(out / JSON_FILE, json.dumps(jsonable(results), indent=2) + "\n")


def open_log(out: Path) -> Path:
    """The log file in ``out``; appended to (the shell script writes the install step into it first)."""
    ensure_dir(out)
    path = out / LOG_FILE
    path.touch()
    return path


def _pct(v: Any) -> str:
    return "—" if v is None else f"{v:.1f}"


def summary_tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) for a terminal: the steps, the failed checks, and the headline figures."""
    tables = []
    rows = []
    for name, step in results.get("steps", {}).items():
        checks = step.get("checks", [])
        rows.append(
            [
                name,
                step.get("status", "?"),
                f"{step.get('seconds', 0):.0f}",
                str(sum(c["ok"] is True for c in checks)),
                str(sum(c["ok"] is False for c in checks)),
                str(sum(c["ok"] is None for c in checks)),
            ]
        )
    tables.append(("gpu check — steps", ["step", "status", "s", "ok", "failed", "n/a"], rows))
    failed = [
        [c["name"], c["detail"]]
        for s in results.get("steps", {}).values()
        for c in s.get("checks", [])
        if c["ok"] is False
    ]
    if failed:
        tables.append(("failed checks", ["check", "detail"], failed[:30]))
    train = results.get("steps", {}).get("train", {})
    rows = []
    for method, entry in train.get("methods", {}).items():
        ref = entry["reference"]
        for amp, run in entry.get("runs", {}).items():
            if run.get("status") != "ok":
                rows.append([method, amp, run.get("status", "?"), "", "", "", ""])
                continue
            rows.append(
                [
                    method,
                    amp,
                    f"{100 * run['test_accuracy']:.2f}",
                    f"{100 * ref['test_accuracy']:.2f}" if ref.get("test_accuracy") is not None else "—",
                    f"{run['img_per_s']:.0f}" if run.get("img_per_s") else "—",
                    f"{run['peak_memory_mb']:.0f}",
                    str(run.get("grad_scale_final", "")),
                ]
            )
    if rows:
        tables.append(
            (
                "training on the demo (test accuracy %, CPU FP32 reference beside it)",
                ["method", "amp", "test %", "cpu fp32 %", "img/s", "peak MiB", "grad scale"],
                rows,
            )
        )
    head = results.get("steps", {}).get("bench", {}).get("headline", {})
    for model, inf in head.get("inference", {}).items():
        rows = [
            [k, f"{v['images_per_s']:.1f}", _pct(v.get("pct_peak")), "" if v["valid"] else "INVALID"]
            for k, v in inf["rows"].items()
        ]
        rows += [[k, f"{v:.3f}", "", ""] for k, v in inf["ratios"].items()]
        peak = head.get("peak", {})
        tables.append(
            (
                f"inference {model} ({inf.get('dtype')}); peak {_pct(peak.get('gflops'))} GFLOP/s "
                f"({peak.get('basis', '')})",
                ["variant / ratio", "img/s / value", "% peak", ""],
                rows,
            )
        )
    for model, tr in head.get("training", {}).items():
        rows = [[m, f"{v['step_time']:.3f}", f"{v['peak_memory']:.3f}"] for m, v in tr["vs_full"].items()]
        tables.append(
            (
                f"training {model} {tr['img_size']} px batch {tr['batch']} ({tr['settings']}): vs full fine-tuning",
                ["method", "step time", "peak memory"],
                rows,
            )
        )
    return tables
