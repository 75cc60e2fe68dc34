"""The one place library exceptions become a one-line message and an exit code (traceback only with PEFTX_DEBUG=1)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from peftx._util import first_line
from peftx.errors import PeftxError

F = TypeVar("F", bound=Callable)

DEBUG_VAR = "PEFTX_DEBUG"
INTERNAL_ERROR_EXIT = 70  # EX_SOFTWARE
INTERRUPTED_EXIT = 130


def _debug() -> bool:
    return os.environ.get(DEBUG_VAR, "") not in ("", "0")


def _fail(message: str, hint: str, code: int) -> typer.Exit:
    line = f"peftx: error: {message}" + (f" — {hint}" if hint else "")
    print(line.replace("\n", " "), file=sys.stderr)
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Wrap a command: PeftxError -> one line + its exit code; anything else -> one line + exit 70."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except PeftxError as e:
            if _debug():
                raise
            raise _fail(e.message, e.hint, e.exit_code) from None
        except KeyboardInterrupt:
            if _debug():
                raise
            raise _fail("interrupted", "", INTERRUPTED_EXIT) from None
        except Exception as e:  # a bug or an unmapped library error: still one line, the traceback on request
            if _debug():
                raise
            raise _fail(
                first_line(f"internal error: {type(e).__name__}: {e}"),
                f"set {DEBUG_VAR}=1 for the traceback and please report it",
                INTERNAL_ERROR_EXIT,
            ) from None

    return wrapper  # type: ignore[return-value]
