"""The layers of docs/architecture.md, kept: import directions, no import cycles, no imports hidden in functions.

The source tree is parsed with ``ast`` (nothing is imported), every import of a peftx module becomes an edge of the
module graph (imports inside functions included: that is where a cycle hides; ``if TYPE_CHECKING:`` imports left
out: they never run), and the graph is checked. The packages in WHOLE_RULE are also held to the rule for every other
import: inside a function only an optional dependency (pyproject's extras) is imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package lives in the repository (pyproject's package-dir).
PACKAGES = {"peftx": ROOT / "peftx", "peftx.cli": ROOT / "cli", "peftx.exports": ROOT / "exports"}

# The library: what the CLI's commands call. Everything of peftx neither here nor in cli/exports is the core.
LIBRARY = (
    "peftx.train",
    "peftx.evaluate",
    "peftx.sources",
    "peftx.deploy",
    "peftx.peft_adapter",
    "peftx.peft_convert",
    "peftx.plain_export",
    "peftx.pipeline",
    "peftx.compare",
    "peftx.compare_worker",
    "peftx.compare_report",
    "peftx.summary",
    "peftx.bench",
    "peftx.gpucheck",
)
# Which layer may import which (docs/architecture.md): cli -> library -> exports -> core.
ALLOWED = {
    "cli": {"cli", "library", "exports", "core"},
    "library": {"library", "exports", "core"},
    "exports": {"exports", "core"},
    "core": {"core"},
}
# Imports of peftx modules inside a function, below the CLI, that stay there on purpose (module: reason).
FUNCTION_LEVEL = {
    "peftx.compare_worker": "its main() imports the trainer so that an import failure is reported as a result line",
}
# Dependencies that may be missing (pyproject's optional extras, and NVIDIA's ModelOpt): imported where they are used.
OPTIONAL = {"tensorrt", "cuda", "polygraphy", "modelopt", "peft", "onnxslim", "sklearn"}
# Modules (and packages) held to the whole rule: no import inside a function, of anything, except an OPTIONAL
# dependency. Elsewhere required third-party packages are still imported inside some functions; those join when done.
WHOLE_RULE = ("peftx.exports.bundle", "peftx.exports.int8")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            rel = path.relative_to(directory).with_suffix("").parts
            if "templates" in rel:  # the bundle's own scripts: they run on the device, without peftx
                continue
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def layer(module: str) -> str:
    if module == "peftx.cli" or module.startswith("peftx.cli."):
        return "cli"
    if module == "peftx.exports" or module.startswith("peftx.exports."):
        return "exports"
    if any(module == lib or module.startswith(lib + ".") for lib in LIBRARY):
        return "library"
    return "core"


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    if path.name != "__init__.py":
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def _known(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges(module: str, path: Path) -> Iterator[Edge]:
    def visit(node: ast.AST, in_function: bool) -> Iterator[Edge]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from visit(ast.Module(body=child.orelse, type_ignores=[]), in_function)
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _base(module, path, child)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            for target in targets:
                if target.startswith("peftx.exports.templates"):  # the device's own scripts: stdlib + numpy, no peftx
                    continue
                known = _known(target) if target.startswith("peftx") else None
                if known is not None and known != module:
                    yield Edge(module, known, child.lineno, in_function)
            yield from visit(child, inner)

    yield from visit(ast.parse(path.read_text(encoding="utf-8")), False)


EDGES = [edge for module, path in MODULES.items() for edge in _edges(module, path)]


def _cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in edges:
        graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_walk_sees_the_packages() -> None:
    assert len(MODULES) > 80 and {"peftx.cli.app", "peftx.exports.bundle", "peftx.train.loop"} <= set(MODULES)
    assert {layer(m) for m in MODULES} == set(ALLOWED)
    assert len(EDGES) > 300


def test_no_import_cycles() -> None:
    cycles = _cycles(EDGES)
    assert not cycles, "import cycles (imports inside functions counted):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_imports_go_down_the_layers() -> None:
    wrong = [
        f"{e.source} ({layer(e.source)}) imports {e.target} ({layer(e.target)}), line {e.line}"
        for e in EDGES
        if layer(e.target) not in ALLOWED[layer(e.source)]
    ]
    assert not wrong, "imports against docs/architecture.md's layers:\n" + "\n".join(wrong)


def test_nothing_below_the_cli_imports_peftx_inside_a_function() -> None:
    hidden = [
        f"{e.source}:{e.line} imports {e.target} inside a function"
        for e in EDGES
        if e.in_function and layer(e.source) != "cli" and e.source not in FUNCTION_LEVEL
    ]
    assert not hidden, "\n".join(hidden)


def _function_imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level name) of each import inside a function of ``path`` (a relative one: "peftx")."""
    for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                yield from ((node.lineno, a.name.partition(".")[0]) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                yield node.lineno, "peftx" if node.level else (node.module or "").partition(".")[0]


def _whole_rule(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in WHOLE_RULE)


def test_the_whole_rule_holds_where_it_is_kept() -> None:
    """In WHOLE_RULE's modules an import inside a function is of an optional dependency, nothing else."""
    held = [m for m in MODULES if _whole_rule(m)]
    assert len(held) > 10
    hidden = sorted(
        {
            f"{module}:{line} imports {name} inside a function"
            for module in held
            for line, name in _function_imports(MODULES[module])
            if name not in OPTIONAL
        }
    )
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize(
    "edges, expected",
    [
        ([("peftx.errors", "peftx.fsutil"), ("peftx.fsutil", "peftx.errors")], [["peftx.errors", "peftx.fsutil"]]),
        ([("peftx.errors", "peftx.fsutil")], []),
    ],
)
def test_the_cycle_finder_finds_a_cycle(edges, expected) -> None:
    assert _cycles([Edge(a, b, 1, False) for a, b in edges]) == expected


def test_the_checks_see_a_wrong_direction_and_a_hidden_import(tmp_path) -> None:
    """The same walk over a module that imports the CLI and the trainer from inside a function."""
    path = tmp_path / "runtime.py"
    path.write_text("def f():\n    from .cli import app\n    from .train.loop import train\n")
    edges = list(_edges("peftx.runtime", path))
    assert [(e.target, e.in_function) for e in edges] == [("peftx.cli.app", True), ("peftx.train.loop", True)]
    assert [layer(e.target) not in ALLOWED["core"] for e in edges] == [True, True]


def test_the_whole_rule_sees_a_required_dependency_and_passes_an_optional_one(tmp_path) -> None:
    path = tmp_path / "step.py"
    path.write_text(
        "import numpy\n\n\ndef f():\n    import onnxruntime as ort\n    import tensorrt\n    from . import x\n"
    )
    found = list(_function_imports(path))
    assert found == [(5, "onnxruntime"), (6, "tensorrt"), (7, "peftx")]
    assert [name in OPTIONAL for _, name in found] == [False, True, False]
