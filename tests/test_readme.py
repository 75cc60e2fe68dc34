"""README.md as a map of the code: its Architecture section names every module, and it points at nothing outside
the repository (a fresh clone is all a reader has)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _architecture() -> str:
    start = README.index("\n## Architecture")
    return README[start : README.index("\n## ", start + 1)]


def test_the_architecture_section_names_every_module() -> None:
    section = _architecture()
    modules = sorted(
        p.relative_to(ROOT)
        for top in ("peftx", "cli", "exports")
        for p in (ROOT / top).rglob("*.py")
        if p.name != "__init__.py" and "templates" not in p.parts
    )
    assert len(modules) > 50  # the walk found the code
    missing = [str(m) for m in modules if not re.search(rf"\b{re.escape(m.stem)}\b", section)]
    assert not missing, f"README's Architecture section does not name: {missing}"


def test_no_reference_outside_the_repository() -> None:
    for text, where in [(README, "README.md"), *((p.read_text(encoding="utf-8"), str(p)) for p in ROOT.glob("*.lock"))]:
        assert "../shared" not in text and "/work/" not in text, where
