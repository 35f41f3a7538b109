"""The package's shape: no import cycle between modules or between packages, and the light entry points stay
light (``mdmt report`` and the results store never import torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every mdmt module ``path`` imports, at module level or inside functions (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mdmt")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("mdmt"):
                out |= {f"{base}.{a.name}" for a in node.names} | {base}
    return out


def module_graph() -> dict[str, set[str]]:
    """mdmt module → the mdmt modules it imports (names that are not modules are dropped)."""
    files = {_module_name(p): p for p in (SRC / "mdmt").rglob("*.py")}
    return {name: {i for i in _imports(path, name) if i in files and i != name} for name, path in files.items()}


def package_of(module: str) -> str:
    """``mdmt.train.run`` → ``mdmt.train``; a top-level module is its own node."""
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    graph = module_graph()
    assert len(graph) > 30
    assert cycles(graph) == []


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, deps in module_graph().items():
        home = package_of(module)
        packages.setdefault(home, set()).update(package_of(d) for d in deps if package_of(d) != home)
    assert cycles(packages) == []


@pytest.mark.parametrize("module", ["mdmt.evaluate.report", "mdmt.store", "mdmt.evaluate.scoring", "mdmt.runs"])
def test_the_results_side_never_imports_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, [m for m in sys.modules if 'torch' in m][:5]"
    subprocess.run([sys.executable, "-c", code], check=True)
