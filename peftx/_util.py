"""Small helpers several modules share: the first line of a message, JSON-ready values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def first_line(text: str | BaseException, limit: int | None = None) -> str:
    """The first line of a message (of an exception: its text, or its type's name when it has none), cut to
    ``limit`` characters when given: what a one-line error may quote of another library's message."""
    if isinstance(text, BaseException):
        text = str(text).strip() or type(text).__name__
    line = (text.splitlines() or [""])[0]
    return line if limit is None else line[:limit]


def jsonable(obj: Any) -> Any:
    """``obj`` as ``json.dumps`` takes it: string keys, lists for tuples, numpy scalars as numbers, paths as strings,
    and non-finite floats as their names ("nan", "inf": JSON has no such numbers)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


__all__ = ["first_line", "jsonable"]
