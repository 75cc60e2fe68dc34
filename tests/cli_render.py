"""Rendering a rich table the way a terminal of a given width shows it, and checking that nothing is cut."""

from __future__ import annotations

import re
from collections.abc import Iterable
from io import StringIO
from typing import Any

from rich.console import Console

RAW_FLOAT = re.compile(r"\d\.\d{6,}")  # e.g. 22.28850870999986: more digits than any table should show


def render(renderable: Any, width: int) -> str:
    buf = StringIO()
    Console(file=buf, width=width, highlight=False, color_system=None).print(renderable)
    return buf.getvalue()


def assert_fits(text: str, width: int, cells: Iterable[Any] = ()) -> None:
    """No "…", no line wider than ``width``, no raw float; at 100 columns every word of ``cells`` intact on a line
    (a word folded across two lines shows up as its two halves, not as itself)."""
    assert "…" not in text, f"a cut-off cell at {width} columns:\n{text}"
    wide = [line for line in text.splitlines() if len(line) > width]
    assert not wide, f"lines wider than {width}: {wide}"
    assert not RAW_FLOAT.search(text), f"a raw float in:\n{text}"
    if width >= 100:
        words = {w for c in cells for w in str(c).split() if len(w) <= 40}
        folded = sorted(w for w in words if w not in text)
        assert not folded, f"words folded across lines at {width} columns: {folded}\n{text}"


def assert_renders(renderable: Any, width: int, cells: Iterable[Any] = ()) -> str:
    text = render(renderable, width)
    assert_fits(text, width, cells)
    return text
