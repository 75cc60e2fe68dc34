"""SIGINT / SIGTERM during training: finish the step, write a resumable checkpoint, then stop."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class StopFlag:
    """Set by SIGINT / SIGTERM; the loop checks it after every step. A second signal aborts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt  # second signal: the user insists; the last per-epoch checkpoint remains
        self.signal = signal.Signals(signum).name


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Route SIGINT / SIGTERM to ``flag`` while training (main thread only; elsewhere signals are untouched)."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
