"""Output helpers shared by every command: one rich console, JSON mode, tables, key/value summaries, and the number
formats people read (the JSON keeps every digit).

Tables are drawn with light rules (``box.SIMPLE_HEAD``: a line under the header, no cell borders), so that a table
of ten short columns fits 100 terminal columns; a cell that still does not fit wraps at spaces, and a single word
longer than its column is folded, never cut off with "…" (``tests/test_cli_tables.py`` renders the tables at 80
and 100 columns). Titles and cells are plain text, never rich markup: a class called ``[cat]`` or a split shown as
``[test]`` prints as written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    # Plain print: machine-readable output must not be wrapped or styled by rich.
    print(json.dumps(data, indent=2, default=str))


def number(v: Any) -> str:
    """A value for a table cell: ints with thousands separators, floats to 4 significant digits (no raw floats)."""
    if isinstance(v, bool) or v is None:
        return "—" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def percent(fraction: float | None, digits: int = 2) -> str:
    return "—" if fraction is None or not math.isfinite(fraction) else f"{100 * fraction:.{digits}f} %"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]], *, right: Iterable[int] = ()) -> Table:
    """A table of plain strings; ``right``: the indices of right-aligned (numeric) columns."""
    t = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    right = set(right)
    for i, c in enumerate(columns):
        t.add_column(Text(c), overflow="fold", justify="right" if i in right else "left")
    for r in rows:
        t.add_row(*(Text(v if isinstance(v, str) else number(v)) for v in r))
    return t


def key_values(title: str, items: dict[str, Any]) -> Table:
    t = Table(
        title=Text(title), title_justify="left", show_header=False, box=box.SIMPLE, pad_edge=False, show_edge=False
    )
    t.add_column("key", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    for k, v in items.items():
        t.add_row(Text(k), Text(number(v)))
    return t
