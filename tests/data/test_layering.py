"""The import graph of visionlora.data, lazy imports included: no circles, and data/ stays below tasks/ and models/.

Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, so an import edge goes to the module and to each
package above it that the importer is not itself inside; a circle through a package ``__init__`` counts. The graph
is the whole package's; the circle check covers everything the data code reaches (the rest of the package is
other layers' business).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "visionlora"
# Layers above the data code; data/ may use lora/, files.py and third-party libraries, never these.
ABOVE_DATA = ("visionlora.tasks", "visionlora.models", "visionlora.export", "visionlora.benchmark", "visionlora.cli")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every visionlora module ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {module for module in found if module in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in _imported(name, path, modules):
            parts = target.split(".")
            above = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
            inside = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
            edges |= {module for module in above - inside if module in modules}
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _reached_from_data(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The part of ``graph`` that the modules of visionlora.data reach (themselves included)."""
    reached, todo = set(), [name for name in graph if name.startswith("visionlora.data")]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    return {name: graph[name] & reached for name in reached}


def test_no_import_circles_in_the_data_code():
    graph = _reached_from_data(_graph())
    assert "visionlora.data.sources" in graph["visionlora.data.classification.datamodule"]
    assert {"visionlora.data.sources.digits", "visionlora.files"} <= set(graph)
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle_through_a_package():
    assert _cycle({"a": {"a.b"}, "a.b": {"c"}, "c": {"a"}}) == ["a", "a.b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_data_imports_no_layer_above_it():
    wrong = {
        (name, target)
        for name, targets in _graph().items()
        if name.startswith("visionlora.data")
        for target in targets
        if target.startswith(ABOVE_DATA)
    }
    assert not wrong, f"visionlora.data imports layers above it: {sorted(wrong)}"
