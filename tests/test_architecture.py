"""The package's shape: the layers drawn in docs/architecture.md hold (no module imports a module drawn above it),
no import cycle between modules or between packages, and the light entry points stay light (``mdmt report`` and
the results store never import torch)."""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHITECTURE = SRC.parent / "docs" / "architecture.md"
_ENTRY = re.compile(r"[\w*]+(/[\w*]+)*(\.py|/)")


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


def layer_drawing(markdown: str) -> list[list[str]]:
    """The layers of the first fenced block, top first, each as the module patterns it names.

    A line that starts in the first column opens a layer; an indented line continues it. A line names modules
    with its leading ``x.py`` and ``pkg/`` tokens and describes them with the rest. ``pkg/`` opening a line is
    the package its following tokens belong to (``data/  dicom.py  sources/``); ``pkg/`` with nothing after it
    is the whole package, ``pkg/x.py`` one module of it. ``__init__.py`` is the package itself, ``*`` matches as
    in a file name.
    """
    block = markdown.split("```", 2)[1]
    layers: list[list[str]] = []
    package = ""
    for line in block.splitlines()[1:]:
        tokens = line.split()
        entries = []
        for token in tokens:
            if not _ENTRY.fullmatch(token):
                break
            entries.append(token)
        if not entries:
            raise ValueError(f"a line of the layer drawing names no module (x.py, pkg/): {line.strip()!r}")
        if not line[0].isspace():
            layers.append([])
            package = ""
            if entries[0].endswith("/") and len(entries) > 1:
                package = entries[0].rstrip("/")
                layers[-1].append(f"mdmt.{package}")
                entries = entries[1:]
        prefix = ".".join(["mdmt"] + ([package] if package else []))
        for entry in entries:
            path = entry.rstrip("/").removesuffix(".py").replace("/", ".")
            if entry.endswith("/"):
                layers[-1] += [f"{prefix}.{path}", f"{prefix}.{path}.*"]
            else:
                layers[-1].append(prefix if path == "__init__" else f"{prefix}.{path}".removesuffix(".__init__"))
    return layers


def assign_layers(modules: set[str], layers: list[list[str]]) -> tuple[dict[str, int], list[str], list[str]]:
    """Each module's layer (0 = top) by the most specific pattern it matches; the modules no pattern names; the
    patterns that name no module."""
    found: dict[str, tuple[tuple[bool, int], int]] = {}
    used: set[str] = set()
    for depth, patterns in enumerate(layers):
        for pattern in patterns:
            for module in fnmatch.filter(modules, pattern):
                used.add(pattern)
                rank = ("*" not in pattern, len(pattern))
                if module not in found or rank > found[module][0]:
                    found[module] = (rank, depth)
    unnamed = sorted(modules - set(found))
    unused = [p for patterns in layers for p in patterns if p not in used]
    return {m: depth for m, (_, depth) in found.items()}, unnamed, unused


def upward_imports(graph: dict[str, set[str]], layer: dict[str, int], layers: list[list[str]]) -> list[str]:
    """One line per import of a module drawn above the importer (same layer is allowed)."""

    def named(depth: int) -> str:
        names = layers[depth]
        return f"layer {depth + 1} ({' '.join(names[:3])}{' ...' if len(names) > 3 else ''})"

    return [
        f"{module} ({named(layer[module])}) imports {dep} ({named(layer[dep])}), which is drawn above it"
        for module in sorted(graph)
        for dep in sorted(graph[module])
        if layer[dep] < layer[module]
    ]


def test_layer_drawing_reader_and_checker_on_a_planted_map():
    drawing = """# A
```
cli.py  experiments/grid.py  commands
train/  run.py  engine.py the run
        checkpoints.py
data/                     every reader
config.py  __init__.py    the config
```
"""
    layers = layer_drawing(drawing)
    assert layers == [
        ["mdmt.cli", "mdmt.experiments.grid"],
        ["mdmt.train", "mdmt.train.run", "mdmt.train.engine", "mdmt.train.checkpoints"],
        ["mdmt.data", "mdmt.data.*"],
        ["mdmt.config", "mdmt"],
    ]
    modules = {"mdmt", "mdmt.cli", "mdmt.experiments.grid", "mdmt.train", "mdmt.train.run", "mdmt.train.engine",
               "mdmt.data", "mdmt.data.sources", "mdmt.data.sources.csv", "mdmt.config", "mdmt.stray"}
    layer, unnamed, unused = assign_layers(modules, layers)
    assert unnamed == ["mdmt.stray"]
    assert unused == ["mdmt.train.checkpoints"]
    assert layer["mdmt.data.sources.csv"] == 2 and layer["mdmt"] == 3
    graph = {"mdmt.cli": {"mdmt.train.run"}, "mdmt.train.run": {"mdmt.train.engine", "mdmt.data"},
             "mdmt.config": {"mdmt.data.sources.csv"}, "mdmt.data": {"mdmt.config"}}
    assert upward_imports(graph, layer, layers) == [
        (
            "mdmt.config (layer 4 (mdmt.config mdmt)) imports mdmt.data.sources.csv "
            "(layer 3 (mdmt.data mdmt.data.*)), which is drawn above it"
        )
    ]
    with pytest.raises(ValueError, match="names no module"):
        layer_drawing("```\ncli.py  commands\nthe config\n```")


def test_docs_architecture_draws_the_layers_the_imports_follow():
    """Imports inside functions count like any other: the graph holds every import statement of the file."""
    layers = layer_drawing(ARCHITECTURE.read_text())
    graph = module_graph()
    layer, unnamed, unused = assign_layers(set(graph), layers)
    assert unnamed == [], f"modules the drawing in {ARCHITECTURE.name} does not name: {unnamed}"
    assert unused == [], f"names in the drawing of {ARCHITECTURE.name} that match no module: {unused}"
    violations = upward_imports(graph, layer, layers)
    assert violations == [], "\n".join(violations)


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


def test_a_module_over_400_lines_says_why_at_its_top():
    """The rule of the house: a file above 400 lines opens with a sentence saying why it is long."""
    long_files = {}
    for path in sorted((SRC / "mdmt").rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 400:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            long_files[str(path.relative_to(SRC))] = "Over 400 lines on purpose:" in " ".join(docstring.split())
    assert long_files, "no module is over 400 lines: the rule has nothing to check, drop this test"
    assert all(long_files.values()), f"over 400 lines without a reason at the top: {[f for f, ok in long_files.items() if not ok]}"
