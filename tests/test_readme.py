"""README.md is the front door and docs/ holds the rest: the README stays short; it, docs/ and benchmarks/ (whose
results/ hold the measured figures) link only files that exist; docs/architecture.md names every module; and nothing
points outside the repository (a fresh clone is all a reader has)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_the_readme_is_a_front_door() -> None:
    # a user reads it in five minutes: the two commands, a quick start, the device hand-off, links
    assert len(README.splitlines()) <= 200
    for heading in ("## Two commands", "## Using it", "## On the device", "## Documentation"):
        assert heading in README


def test_every_link_to_a_local_file_resolves() -> None:
    for path in [ROOT / "README.md", *DOCS, *sorted((ROOT / "benchmarks").rglob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links {target}, which does not exist"


def test_the_architecture_doc_names_every_module() -> None:
    section = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = sorted(
        p.relative_to(ROOT)
        for top in ("peftx", "cli", "exports")
        for p in (ROOT / top).rglob("*.py")
        if p.name != "__init__.py" and "templates" not in p.parts
    )
    assert len(modules) > 50  # the walk found the code
    missing = [str(m) for m in modules if not re.search(rf"\b{re.escape(m.stem)}\b", section)]
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_no_reference_outside_the_repository() -> None:
    texts = [(README, "README.md"), *((p.read_text(encoding="utf-8"), str(p)) for p in [*ROOT.glob("*.lock"), *DOCS])]
    for text, where in texts:
        assert "../shared" not in text and "/work/" not in text, where
