"""The package's import graph: layers point down, and no modules import each other in a cycle.

Read statically (``ast``) from the source, every import counts, inside functions too, except
those under ``if TYPE_CHECKING``: a lazy import is still a dependency a reader has to follow. So
does a package's lazy export map (``_EXPORTS`` served by ``lazy_exports.lazy_getattr``: the
package depends on each submodule it names) and ``importlib.import_module("onediffx....")``.

Cycles are counted twice: between modules, and between folders (each module collapsed into its
folder under ``onediffx/``; modules at the package root stand alone), since a circle between
folders makes them one unit to read and test however acyclic the files inside are.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onediffx"

APP = ("onediffx.cli", "onediffx.__main__", "onediffx.commands", "onediffx.sweep",
       "onediffx.startup", "onediffx.bench", "onediffx.serve", "onediffx.client")
STAGES = ("onediffx.stages", "onediffx.resolver", "onediffx.assembly", "onediffx.generate")
LIBRARY = ("onediffx.compile", "onediffx.lora", "onediffx.deep_cache", "onediffx.step_cache", "onediffx.parallel", "onediffx.instantid", "onediffx.quantize", "onediffx.graph_cache",
           "onediffx.models", "onediffx.config", "onediffx.device", "onediffx.errors", "onediffx.metrics",
           "onediffx.registry", "onediffx.resources", "onediffx.hooks", "onediffx.mixins", "onediffx.lazy_exports",
           "onediffx.plugin_loader", "onediffx.requirements", "onediffx.state", "onediffx.fused_qkv",
           "onediffx.quantized_weights", "onediffx.cuda_graphs", "onediffx.graph_timing", "onediffx.call_signature", "onediffx.presets",
           "onediffx.bounded", "onediffx.denoiser")


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
        elif _is_import_module(node):
            found.add(node.args[0].value)
    if path.name == "__init__.py":
        found |= {f"{name}.{sub}" for sub in _lazy_exports(tree)}
    return {m for m in found if m in known and m != name}


def _is_import_module(node: ast.AST) -> bool:
    """``importlib.import_module("onediffx.x")`` (or ``import_module``) with a literal name."""
    return (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and len(node.args) == 1
            and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("onediffx"))


def _lazy_exports(tree: ast.Module) -> set[str]:
    """The submodules a package's ``_EXPORTS`` map (name -> submodule) serves attributes from."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return set(ast.literal_eval(node.value).values()) if isinstance(node.value, ast.Dict) else set()
    return set()


def _folder(module: str) -> str:
    """``onediffx.compile.pipe`` -> ``onediffx.compile``; a module at the package root stands alone."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components: any component of more than one node is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
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
    return cycles


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
    assert _cycles(graph) == []


def test_lazy_exports_count_as_imports(graph):
    assert "onediffx.deep_cache.pipelines" in graph["onediffx.deep_cache"]
    assert "onediffx.quantize.pipe" in graph["onediffx"]  # importlib.import_module("onediffx.quantize.pipe")


def test_no_import_cycles_between_folders(graph):
    folders: dict[str, set[str]] = {}
    for module, deps in graph.items():
        folders.setdefault(_folder(module), set()).update(_folder(d) for d in deps if _folder(d) != _folder(module))
    cycles = _cycles(folders)
    edges = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps for c in cycles
                   if _folder(m) in c and _folder(d) in c and _folder(m) != _folder(d))
    assert (cycles, edges) == ([], [])
