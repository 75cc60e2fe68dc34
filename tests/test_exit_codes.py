"""The exit-code tables people read (README.md, docs/ERRORS.md) against the exception classes that set the codes:
every class listed once, under its own code, and nothing listed that does not exist."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import peftx.errors as errors
from peftx.cli.errors import INTERNAL_ERROR_EXIT, INTERRUPTED_EXIT

REPO = Path(__file__).resolve().parents[1]
CLASSES = {
    name: cls
    for name, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.PeftxError) and cls is not errors.PeftxError
}


def exit_table(path: Path, header: str) -> dict[int, str]:
    """code -> the error column of the markdown table that starts with ``header``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows: dict[int, str] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        code = int(cells[0])
        assert code not in rows, f"{path.name}: exit {code} listed twice"
        rows[code] = cells[1]
    return rows


@pytest.mark.parametrize(
    "path, header", [(REPO / "README.md", "| exit | error"), (REPO / "docs" / "ERRORS.md", "| code | error")]
)
def test_exit_code_table_matches_the_exception_classes(path: Path, header: str) -> None:
    table = exit_table(path, header)
    listed: dict[str, int] = {}
    for code, cell in table.items():
        for name in re.findall(r"`(\w+)`", cell):
            assert name in CLASSES, f"{path.name}: `{name}` (exit {code}) is not an exception class"
            assert name not in listed, f"{path.name}: {name} listed twice"
            listed[name] = code
    assert listed == {name: cls.exit_code for name, cls in CLASSES.items()}, path.name
    assert "internal error" in table[INTERNAL_ERROR_EXIT] and INTERRUPTED_EXIT in table


def test_the_check_sees_a_wrong_code(tmp_path: Path) -> None:
    """The check can fail: a table that lists UsageError under 3 is caught."""
    text = (REPO / "README.md").read_text(encoding="utf-8").replace("| 2 | `UsageError`, ", "| 2 | ", 1)
    fake = tmp_path / "README.md"
    fake.write_text(text.replace("| 3 | `WeightsError`", "| 3 | `UsageError`, `WeightsError`", 1), encoding="utf-8")
    with pytest.raises(AssertionError, match="UsageError"):
        test_exit_code_table_matches_the_exception_classes(fake, "| exit | error")
