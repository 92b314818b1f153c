"""Dependencies inside the package point one way: no module imports, directly or through
others, a module that imports it back. Every import counts, at the top or inside a function
(an import moved into a function to break a circle still is one)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the repository's folders and the package names they are installed as (pyproject.toml)
FOLDERS = {"fastcnn": ROOT / "fastcnn", "fastcnn.kernels": ROOT / "kernels"}


def package_modules():
    """{module name: path} of every module in the package."""
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imported_by(name, path, modules):
    """The package's modules that module ``name`` (at ``path``) imports."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            # `from base import x`: the submodule base.x where there is one, else base itself
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                         for a in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph():
    modules = package_modules()
    return {name: imported_by(name, path, modules) for name, path in modules.items()}


def find_circle(graph):
    """One circle of imports as a list [a, b, ..., a], or None."""
    state = {}  # name -> "open" (on the current path) or "done"

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                circle = visit(nxt, path + [nxt])
                if circle:
                    return circle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            circle = visit(start, [start])
            if circle:
                return circle
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 20 and "fastcnn.kernels._contract" in graph["fastcnn.layers"]
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_trainer_sits_above_the_network_not_beside_it():
    graph = import_graph()
    assert "fastcnn.training" in graph["fastcnn.network"]  # fit is the trainer's entry point
    assert "fastcnn.network" not in graph["fastcnn.training"]


@pytest.mark.parametrize("code, expected", [
    ("from . import b", ["a", "b", "a"]),
    ("def f():\n    from .b import g", ["a", "b", "a"]),  # a function-level import counts
    ("import math", None),
])
def test_the_circle_finder_sees_what_it_must(tmp_path, monkeypatch, code, expected):
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "a.py").write_text(code)
    (folder / "b.py").write_text("import pkg.a\n")
    monkeypatch.setitem(FOLDERS, "pkg", folder)
    graph = {name.removeprefix("pkg."): {m.removeprefix("pkg.") for m in deps}
             for name, deps in import_graph().items() if name.startswith("pkg.")}
    assert find_circle(graph) == expected
