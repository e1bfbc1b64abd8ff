"""The package's shape, checked: layers, no cycles, small modules and functions.

Dependencies point down: cli -> run -> fork/disks/plugin -> backends -> vm -> host ->
model/errors/paths. Every import counts, also the ones inside functions and under
TYPE_CHECKING: a lazy import that runs back up a layer is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "kvmsnap_plugin"
#: layer of each sub-package (or top-level module); a module imports only from its own
#: sub-package or from lower layers
LAYERS = {
    "errors": 0, "paths": 0, "model": 1,
    "host": 2,
    "vm": 3,
    "backends": 4,
    "fork": 5, "disks": 5, "plugin": 5,
    "run": 6, "config": 6,
    "cli": 7,
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def internal_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    return {target for target in imports_of(path) if target in known and target != name}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package root: for plugins, never imported by the package itself
    return LAYERS[parts[1]]


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "kvmsnap_plugin"
            and m.split(".")[1] not in LAYERS] == []


def test_imports_point_down_or_sideways_within_a_sub_package():
    known = modules()
    upward = []
    for name, path in known.items():
        if name == "kvmsnap_plugin":
            continue
        for target in internal_imports(name, path, known):
            same_package = name.split(".")[:2] == target.split(".")[:2]
            if target == "kvmsnap_plugin" or (not same_package and layer(target) >= layer(name)):
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_no_import_cycles():
    known = modules()
    graph = {name: internal_imports(name, path, known) for name, path in known.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


@pytest.mark.parametrize("forbidden", ["pytest", "kvmsnap_demo"])
def test_the_runtime_package_never_imports_the_test_rig(forbidden):
    users = [name for name, path in modules().items()
             if any(t == forbidden or t.startswith(forbidden + ".") for t in imports_of(path))]
    assert users == []


def test_modules_are_small():
    big = {name: n for name, path in modules().items()
           if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert big == {}


def test_functions_are_short():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert long == []
