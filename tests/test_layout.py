"""The shape of the code: no import cycle, one-way layers (core <- run <- studies <- cli), small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "leanft"
LAYERS = {"core": 0, "run": 1, "studies": 2}  # a module may import its own layer and those below it
TOP = 3  # leanft/__init__, cli, __main__: above every layer


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def leanft_imports(path: Path) -> set[str]:
    """Every leanft module ``path`` imports, at module level or inside functions (``TYPE_CHECKING`` too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("leanft")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leanft"):
            found.add(node.module)
    return found


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {dep for dep in leanft_imports(path) if dep in MODULES} for name, path in MODULES.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def test_the_walk_sees_the_packages():
    assert {"leanft.core.paca", "leanft.run.train", "leanft.studies.bench", "leanft.cli"} <= set(MODULES)
    assert "leanft.core.paca_layer" in GRAPH["leanft.core.paca"]


def test_each_layer_imports_only_itself_and_those_below():
    upward = sorted(
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        for dep in deps
        if layer(dep) > layer(name) and dep != "leanft"
    )
    assert not upward


def test_no_import_cycle():
    """Depth-first search for a back edge among leanft's own modules (package ``__init__`` files excluded)."""
    graph = {n: {d for d in deps if MODULES[d].name != "__init__.py"} for n, deps in GRAPH.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_small(name):
    source = MODULES[name].read_text()
    assert len(source.splitlines()) <= 400, f"{name} has more than 400 lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Parameters a caller can pass (``self`` / ``cls`` not counted; ``*args`` and ``**kwargs`` one each)."""
    arguments = node.args
    names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names) + (arguments.vararg is not None) + (arguments.kwarg is not None)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_takes_more_than_six_parameters(name):
    tree = ast.parse(MODULES[name].read_text())
    crowded = [
        f"{node.name} ({parameter_count(node)} parameters)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and parameter_count(node) > 6
    ]
    assert not crowded
