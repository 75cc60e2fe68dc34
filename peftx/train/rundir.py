"""The run directory: what a run writes, where, and the rules that keep an old run's files from passing for a new
run's.

    adapter.safetensors, adapter_config.json   best epoch on VALIDATION (never on test)
    metrics.jsonl                              one line per epoch
    summary.json                               selection, test accuracy at the selected epoch, cost
    curves.png                                 loss / accuracy per epoch
    confusion.png                              confusion matrix of the selected epoch (test, else val)
    val_split.json                             the validation files drawn from train/ (ImageFolder without val/)
    checkpoint/last.safetensors                resumable state, rewritten atomically every epoch and on SIGINT/SIGTERM
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ..adapter_io import ADAPTER_FILE, CONFIG_FILE
from ..data import VAL_SPLIT_FILE
from ..distributed import DistInfo
from ..errors import OutputError
from ..fsutil import ensure_dir, output_error, write_text_atomic
from ..plotting import plot_curves
from .checkpoint import checkpoint_path
from .config import TrainConfig, is_demo_data

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion.png"


def default_output(cfg: TrainConfig) -> str:
    data = "demo" if is_demo_data(cfg.data) else Path(str(cfg.data)).name or "data"
    return str(Path("runs") / f"{cfg.method}-{data}-{datetime.now():%Y%m%d-%H%M%S}")


def run_files(run_dir: Path) -> list[Path]:

    names = (ADAPTER_FILE, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CURVES_FILE, CONFUSION_FILE, VAL_SPLIT_FILE)
    return [run_dir / n for n in names] + [checkpoint_path(run_dir)]


def prepare_run_dir(cfg: TrainConfig, info: DistInfo, *, create: bool) -> Path:
    """The run directory; a new run refuses one holding another run, or (``overwrite``) deletes that run's files
    first, so an interrupted new run never leaves the old run's adapter or summary looking like its own.

    Called twice: ``create=False`` checks before anything is built (fail fast), ``create=True`` creates the
    directory only once the data, weights and model have built, so an early error leaves nothing behind."""
    run_dir = Path(cfg.output or default_output(cfg))
    if info.is_main:
        old = [p for p in run_files(run_dir) if p.exists()] if cfg.resume is None else []
        if old and not cfg.overwrite:
            raise OutputError(
                f"{run_dir} already holds a training run",
                f"resume it with --resume {run_dir}, pass --force to replace it, or choose another --output",
            )
        if not create:
            return run_dir
        for path in old:
            try:
                path.unlink()
            except OSError as e:
                raise output_error(path, e) from None
        ensure_dir(run_dir)
    return run_dir


def remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # refuses a non-empty directory: what a run wrote is never removed
    except OSError:
        pass


def write_metrics(run_dir: Path, history: list[dict[str, Any]], *, best_epoch: int | None, title: str) -> None:
    """metrics.jsonl (one line per epoch) and curves.png, both rewritten whole (atomically) each epoch."""
    write_text_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))
    plot_curves(history, run_dir / CURVES_FILE, best_epoch=best_epoch, title=title)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    return write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
