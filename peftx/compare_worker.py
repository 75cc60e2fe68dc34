"""One run of a comparison, in its own process: ``python -m peftx.compare_worker '<TrainConfig JSON>'``.

Started by :func:`peftx.compare.compare`. Writes JSON lines on stdout — ``worker`` (the process's RSS before the
run), the trainer's progress events (those :data:`peftx.events.FORWARDED` lists), and one final ``result``
({status: ok | failed | interrupted, reason, error_type}) — and everything else (warnings, a traceback) on stderr,
which compare keeps in the run's compare.log.
Exit status: 0, the error's exit code, or 130 when interrupted.
"""

from __future__ import annotations

import json
import resource
import sys
import traceback
from typing import Any

from peftx._util import first_line


def _send(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    sys.stdout.flush()


def _die_with_parent() -> None:
    """Linux: SIGTERM when compare's process dies (even by SIGKILL), so an orphaned trainer checkpoints and stops
    instead of training on unseen (it runs in its own session, out of reach of the terminal's Ctrl-C)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> int:
    _die_with_parent()
    from peftx.errors import PeftxError, TrainingInterrupted

    try:
        from peftx.events import FORWARDED, Event, to_message
        from peftx.train import TrainConfig, train

        cfg = TrainConfig.from_dict(json.loads(argv[0]))
        _send("worker", baseline_rss_mb=_rss_mb())  # python + torch + peftx imported, nothing built yet

        def forward(event: Event) -> None:
            if isinstance(event, FORWARDED):
                _send(**to_message(event))

        train(cfg, progress=forward)
    except KeyboardInterrupt:  # a signal before the trainer installed its handlers, or a second one
        _send("result", status="interrupted", reason="interrupted before a checkpoint", error_type="KeyboardInterrupt")
        return 130
    except Exception as e:  # noqa: BLE001 - every failure is reported to compare as a row, never lost
        if isinstance(e, TrainingInterrupted):
            _send("result", status="interrupted", reason=e.message, error_type=type(e).__name__)
            return e.exit_code
        if isinstance(e, PeftxError):
            _send(
                "result",
                status="failed",
                reason=e.message + (f" ({e.hint})" if e.hint else ""),
                error_type=type(e).__name__,
            )
            return e.exit_code
        traceback.print_exc()
        _send(
            "result",
            status="failed",
            reason=first_line(f"internal error: {type(e).__name__}: {e}"),
            error_type=type(e).__name__,
        )
        return 70
    _send("result", status="ok", reason=None, error_type=None, cpu_seconds=_cpu_seconds())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
