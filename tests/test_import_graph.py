"""The package's import graph has no circles.

Every `import` / `from ... import` in distillspec/**/*.py counts: module-level, inside functions, and under
`if TYPE_CHECKING:`. `from pkg import name` is an arrow to the module pkg.name when that is a module of the
package, else to pkg itself (its __init__). Importing a.b.c also runs a/__init__ and a/b/__init__; those implicit
arrows are not counted (a package __init__ that re-exports its children would otherwise make every child that
imports a sibling a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "distillspec"
ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: modules of the package it imports}, over every .py file under root/distillspec."""
    files = {module_name(p, root): p for p in sorted((root / PKG).rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . / .. / .x import y
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in files else base)
            for t in targets:
                while t and t not in files and "." in t:  # import a.b.attr style: the longest module prefix
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / PKG / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / PKG / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from distillspec.sub.b import g\n    return g\n")
    (pkg / "b.py").write_text("from . import a\nimport distillspec.sub.c\n")
    (pkg / "c.py").write_text("from distillspec.sub import a as _a\n")
    g = import_graph(tmp_path)
    assert g["distillspec.sub.a"] == {"distillspec.sub.b"}
    assert g["distillspec.sub.b"] == {"distillspec.sub.a", "distillspec.sub.c"}
    assert cycles(g) == [["distillspec.sub.a", "distillspec.sub.b", "distillspec.sub.c"]]


def test_no_import_circles_in_the_package():
    found = cycles(import_graph())
    assert not found, "import circles (each a set of modules that reach each other): " + "; ".join(
        " <-> ".join(c) for c in found)
