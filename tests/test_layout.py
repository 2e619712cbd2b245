"""The package's layering, checked from the source: each module imports only from its own
layer or the layers below, within a layer the imports form no cycle, and no source file
exceeds 500 lines (CONTRIBUTING.md: the layout).

Layers, lowest first: the torch internals and device questions; the linear algebra and the
cache (independent of each other); the hard constraints; the soft constraints; the report
(which reads both); interop; the top-level names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "manifoldparam"

LAYERS: list[set[str]] = [
    {"manifoldparam._torch"},
    {"manifoldparam._device"},
    {"manifoldparam.linalg", "manifoldparam.caching"},
    {"manifoldparam.hard"},
    {"manifoldparam.soft"},
    {"manifoldparam.report"},
    {"manifoldparam.interop"},
    {"manifoldparam"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of a module: that of its longest listed prefix."""
    best, depth = -1, -1
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = i, len(prefix)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS"
    return best


def imports_of(path: Path) -> set[str]:
    """The manifoldparam modules ``path`` imports, at any depth (function-level included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("manifoldparam"):
                for alias in node.names:  # ``from manifoldparam import _torch``: the module
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: use absolute imports")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("manifoldparam")}
    return found


SOURCES = sorted(ROOT.rglob("*.py"))
MODULES = {module_name(p) for p in SOURCES}
GRAPH = {module_name(p): imports_of(p) - {module_name(p)} for p in SOURCES}


def test_every_module_is_in_a_layer() -> None:
    for module in GRAPH:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module: str) -> None:
    # Docstring examples (``import manifoldparam as mp`` inside a code block) are text, not
    # imports: ast only sees real statements.
    mine = layer_of(module)
    up = sorted(m for m in GRAPH[module] if layer_of(m) > mine)
    assert not up, f"{module} (layer {mine}) imports from higher layers: {up}"


def test_no_import_cycle() -> None:
    """Depth-first over the explicit imports (within a layer, where the layer test allows
    them both ways)."""
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(m) :], m])}")
        state[m] = 1
        for n in sorted(GRAPH.get(m, ())):
            visit(n, [*path, m])
        state[m] = 2

    for m in sorted(GRAPH):
        visit(m, [])


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_source_file_over_500_lines(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= 500, f"{path.relative_to(ROOT.parent)} has {n} lines; split it by job"


def test_the_layer_check_can_fail(tmp_path: Path) -> None:
    """The check sees an upward import (a caching module importing the hard constraints)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from manifoldparam.hard.base import Parametrization\n")
    assert layer_of("manifoldparam.caching.bad") < max(map(layer_of, imports_of(bad)))
