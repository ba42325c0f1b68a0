"""The layering contract, read from the source: arrows only point down (runner -> cluster -> stages).

* `stages/` (the maths) imports neither `runner` nor `cluster`; `cluster/` does not import `runner`
  (a submitted job runs the `cascade` entry point by name); only `cluster/` imports `ray`.
* Imports sit at the top of a module. One inside a function must say why on its own line
  (`# lazy: <reason>`: an optional dependency, start-up cost, or a registration cycle by design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "cluster", "runner")
FORBIDDEN = {
    "stages": ("runner", "cluster", "ray"),
    "cluster": ("runner",),
    "runner": ("ray",),
}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(tree: ast.AST):
    """(module name, node, inside a function?) for every import statement."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, child, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module, child, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_upward_imports(package):
    problems = []
    for path in _modules(package):
        for name, node, _ in _imports(ast.parse(path.read_text())):
            top = name.split(".")[0]
            if top in FORBIDDEN[package]:
                rel = path.relative_to(ROOT)
                problems.append(f"{rel}:{node.lineno} imports {name}")
    assert not problems, f"{package}/ must not import {FORBIDDEN[package]}:\n" + "\n".join(problems)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_inside_functions_state_their_reason(package):
    problems = []
    for path in _modules(package):
        lines = path.read_text().splitlines()
        for _name, node, in_function in _imports(ast.parse("\n".join(lines))):
            if not in_function:
                continue
            line = lines[node.lineno - 1]
            if "# lazy:" not in line and "# lazy:" not in lines[node.lineno - 2]:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {line.strip()}")
    assert not problems, "imports inside functions without `# lazy: <reason>`:\n" + "\n".join(
        problems
    )
