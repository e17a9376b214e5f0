"""The package's import graph: no circle anywhere (lazy imports inside functions included) and the house layering.

The graph is read from the source with ``ast``, not by importing, so an import inside a function counts as much as
one at the top of a file. An edge goes from a module to the module it names (``from visionlora.data import X``
names ``visionlora.data``; ``from visionlora.data import sources`` names only ``visionlora.data.sources`` when
that is a module, since Python then loads the submodule, not more of the package).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "visionlora"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at any depth of the file (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # A name that is a submodule is an edge to that module; any other name is one to ``base`` itself.
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(MODULES)
            found |= submodules or {base}
            if len(submodules) < len(node.names):
                found.add(base)
    return found


def internal_edges() -> dict[str, set[str]]:
    """``{module: the package modules it imports}``, each import resolved to a module that exists.

    Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, so the edge goes to the module and to each
    package above it that the importer is not itself inside: a circle through a package ``__init__`` counts.
    """
    edges = {}
    for name, path in MODULES.items():
        inside = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        above = set()
        for target in imported_names(path):
            parts = target.split(".")
            above |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        edges[name] = {module for module in above - inside if module in MODULES}
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_sees_lazy_and_relative_imports():
    edges = internal_edges()
    assert "visionlora.cli.detection" in edges["visionlora.cli"]  # imported inside main()
    assert "visionlora.lora.adapter_files" in edges["visionlora.lora.adapter"]  # from .adapter_files import ...
    assert "visionlora.data" in edges["visionlora.cli.classification"]  # the package __init__ runs first
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    assert cycles(internal_edges()) == []


def external_roots(prefix: str) -> set[str]:
    """Top-level distributions imported by the modules under ``prefix`` (the package itself and the stdlib left out)."""
    roots = set()
    for name, path in MODULES.items():
        if name == prefix or name.startswith(prefix + "."):
            roots |= {target.split(".")[0] for target in imported_names(path)}
    return roots - {"visionlora", "__future__"} - set(sys.stdlib_module_names)


def internal_targets(prefix: str) -> set[str]:
    edges = internal_edges()
    return {t for name, targets in edges.items() if name == prefix or name.startswith(prefix + ".") for t in targets}


def test_lora_depends_on_torch_and_safetensors_only():
    assert external_roots("visionlora.lora") <= {"torch", "safetensors"}
    outside = {t for t in internal_targets("visionlora.lora") if not t.startswith("visionlora.lora")}
    assert outside <= {"visionlora.files"}


def test_files_is_standard_library_only():
    assert external_roots("visionlora.files") == set()
    assert internal_targets("visionlora.files") == set()


@pytest.mark.parametrize(("layer", "forbidden"), [
    ("visionlora.data", ("visionlora.tasks", "visionlora.models", "visionlora.export", "visionlora.benchmark",
                         "visionlora.cli")),
    ("visionlora.models", ("visionlora.tasks", "visionlora.data", "visionlora.export", "visionlora.cli")),
    ("visionlora.tasks", ("visionlora.data", "visionlora.export", "visionlora.cli")),
    ("visionlora.reporting", ("visionlora.tasks", "visionlora.data", "visionlora.models", "visionlora.cli")),
])
def test_layers_import_nothing_above_them(layer, forbidden):
    offending = sorted(t for t in internal_targets(layer) if t.startswith(forbidden))
    assert offending == []
