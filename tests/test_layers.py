"""The package's import graph: layers point down, and no modules import each other in a cycle.

Read statically (``ast``) from the source, every import counts, inside functions too, except
those under ``if TYPE_CHECKING``: a lazy import is still a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onediffx"

APP = ("onediffx.cli", "onediffx.__main__", "onediffx.commands", "onediffx.batch", "onediffx.sweep",
       "onediffx.startup", "onediffx.bench", "onediffx.serve", "onediffx.client")
STAGES = ("onediffx.stages", "onediffx.resolver", "onediffx.assembly", "onediffx.generate")
LIBRARY = ("onediffx.compile", "onediffx.lora", "onediffx.deep_cache", "onediffx.instantid", "onediffx.quantize", "onediffx.graph_cache",
           "onediffx.models", "onediffx.config", "onediffx.device", "onediffx.errors", "onediffx.metrics",
           "onediffx.registry", "onediffx.resources", "onediffx.hooks", "onediffx.mixins", "onediffx.lazy_exports",
           "onediffx.plugin_loader", "onediffx.requirements")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The onediffx modules ``name`` imports (a ``from X import y`` of a submodule counts as X.y)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _in(name: str, layer: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in layer)


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if m != "onediffx" and not _in(m, APP + STAGES + LIBRARY)] == []


def test_library_never_imports_stages_or_app(graph):
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if _in(m, LIBRARY) for d in deps if _in(d, APP + STAGES))
    assert bad == []


def test_stages_never_import_the_app(graph):
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if _in(m, STAGES) for d in deps if _in(d, APP))
    assert bad == []


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: any component of more than one module is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []
