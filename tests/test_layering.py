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


# ---- family facts live in the adapters ---------------------------------------------------------
FAMILY_KEYS = {"family", "model_type"}
ADAPTERS = "stages/arch/"  # the adapters and their registry (keyed by model_type)
# files outside the adapters (stages/arch/) allowed to name families, and why
FAMILY_ALLOWED = {
    "runner/demo_models.py": "builds the built-in demo models: it names the two families it builds",
}


def _names_family(node: ast.AST) -> bool:
    """`x.family`, `model_type`, `cfg["model_type"]`, `d.get("family")`, `getattr(c, "model_type")`."""
    if isinstance(node, ast.Name):
        return node.id in FAMILY_KEYS
    if isinstance(node, ast.Attribute):
        return node.attr in FAMILY_KEYS
    if isinstance(node, ast.Subscript):
        return _is_key(node.slice)
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "get":
            return _is_key(node.args[0])
        if isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) > 1:
            return _is_key(node.args[1])
    return False


def _is_key(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in FAMILY_KEYS


def _string_literal(node: ast.AST, constants: dict[str, ast.AST]) -> bool:
    """A string, or a tuple / list / set / dict (keys) / frozenset of strings, or a module
    constant bound to one."""
    if isinstance(node, ast.Name) and node.id in constants:
        return _string_literal(constants[node.id], {})
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return bool(node.elts) and all(_string_literal(e, {}) for e in node.elts)
    if isinstance(node, ast.Dict):
        return bool(node.keys) and all(k is not None and _string_literal(k, {}) for k in node.keys)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
        return node.func.id in ("frozenset", "set", "tuple") and _string_literal(node.args[0], {})
    return False


def family_branches(tree: ast.Module) -> list[int]:
    """Lines comparing a family / model_type with names (==, in), or looking one up in a table
    keyed by names."""
    constants = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Name):
                constants[target.id] = node.value
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(map(_names_family, operands)) and any(
                _string_literal(o, constants) for o in operands
            ):
                lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and _names_family(node.slice):
            if _string_literal(node.value, constants):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            table, key = node.func.value, node.args[0]
            if node.func.attr == "get" and _names_family(key) and _string_literal(table, constants):
                lines.append(node.lineno)
    return lines


def test_no_family_branches_outside_the_adapters():
    """`family == "llama"` or `model_type in (...)` outside stages/arch/ is a family fact that
    a new architecture would have to be added to by hand: give the adapter a capability instead
    (stages/arch/base.py ArchAdapter)."""
    problems = []
    for package in PACKAGES:
        for path in _modules(package):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(ADAPTERS) or rel in FAMILY_ALLOWED:
                continue
            for line in family_branches(ast.parse(path.read_text())):
                problems.append(f"{rel}:{line}")
    assert not problems, "branches on family / model_type outside the adapters:\n" + "\n".join(
        problems
    )


@pytest.mark.parametrize(
    "source",
    [
        'if spec.family == "gpt2": pass',
        'ok = config.model_type in {"llama", "mistral"}',
        'TYPES = ("bert", "roberta")\nok = raw.get("model_type") not in TYPES',
        'ok = getattr(cfg, "model_type", None) != "qwen2"',
        'arch = {"llama": 1, "qwen2": 2}[ckpt.model_type]',
        'NAMES = {"llama": 1}\narch = NAMES.get(pruning["family"])',
    ],
)
def test_the_family_check_sees_each_form(source):
    assert family_branches(ast.parse(source))


def test_the_family_check_lets_capabilities_and_registries_pass():
    source = (
        "ok = adapter.streamable and model_type in CONFIG_MAPPING\n"
        'name = config.get("model_type", "?")\n'
        "classes = modeling.CLASSES.get(ckpt.model_type)\n"
        'kind = "deci" if not uniform else adapter.gguf_architecture(model_type)\n'
    )
    assert family_branches(ast.parse(source)) == []
