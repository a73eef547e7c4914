"""The house rules a reviewer would check by hand: queries, imports, module sizes."""

from __future__ import annotations

import ast
import importlib.resources
import re
from pathlib import Path

import pytest

from syncd import db

PACKAGE = Path(__file__).resolve().parents[2] / "syncd"
MAX_MODULE_LINES = 500


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """The syncd modules `name` imports, TYPE_CHECKING blocks included: a type named from
    another module is a dependency on its concept as much as a run-time import is."""
    tree = ast.parse(path.read_text())
    known = modules()
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("syncd")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("syncd"):
            out.add(node.module)
            # `from syncd import plan` imports the module syncd.plan
            out |= {f"{node.module}.{a.name}" for a in node.names} & set(known)
    return out - {name}


def test_every_query_used_exists_and_every_query_defined_is_used() -> None:
    defined = set(db.load_queries())
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    used = set(re.findall(r"""query\(\s*["']([a-z_]+)["']\s*\)""", source))
    used |= set(re.findall(r"""load_queries\(\)\[["']([a-z_]+)["']\]""", source))
    assert used - defined == set(), "query() names with no SQL block"
    assert defined - used == set(), "SQL blocks nothing runs"


def test_a_query_name_defined_twice_fails_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = importlib.resources.files("syncd.db") / "queries"
    first = sorted(f.name for f in folder.iterdir() if f.name.endswith(".sql"))[0]
    original = Path(str(folder / first)).read_text()
    db.load_queries.cache_clear()
    try:
        monkeypatch.setattr(
            Path, "read_text", lambda self, encoding=None: original + "\n" + original
        )
        with pytest.raises(ValueError, match="defined twice"):
            db.load_queries()
    finally:
        monkeypatch.undo()
        db.load_queries.cache_clear()
    assert db.load_queries()


def test_the_sandbox_imports_nothing_from_the_rest_of_syncd() -> None:
    for name, path in modules().items():
        if name.startswith("syncd.sandbox"):
            outside = {m for m in imports_of(name, path) if not m.startswith("syncd.sandbox")}
            assert outside == set(), f"{name} imports {outside}"


def test_no_import_cycle_anywhere() -> None:
    known = modules()
    graph = {name: imports_of(name, path) & set(known) for name, path in known.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of concepts.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = [*trail[trail.index(dep) :], dep] if dep in trail else [node, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_is_over_the_size_limit() -> None:
    big = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert big == {}
