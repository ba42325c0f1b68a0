"""The layering contract, read from the source: arrows only point down (runner -> cluster -> stages).

* `stages/` (the maths) imports neither `runner` nor `cluster`; `cluster/` does not import `runner`
  (a submitted job runs the `cascade` entry point by name); only `cluster/` imports `ray`.
* Inside a package the folders keep their place (FOLDER_RULES): nothing imports the command line
  (runner/cli/), data (runner/data/) and reports (runner/report/) run no job, the adapters
  (stages/arch/) read no other stage, and only cluster/ and runner/ lean on the streamed path
  (stages/streaming/). A module belongs in its folder, not beside it under a name prefix.
* Imports are absolute (a relative one would slip past these rules) and sit at the top of a
  module. One inside a function must say why on its own line (`# lazy: <reason>`: an optional
  dependency, start-up cost, or a registration cycle by design).
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


# ---- the folders keep their place inside a package ---------------------------------------------
# (modules under `where` but not under `but_not`) must not import `forbidden` (a name or anything
# under it) unless it is under one of `allowed`; `why` is the failure message.
FOLDER_RULES = {
    "the command line": dict(
        where="runner/",
        but_not="runner/cli/",
        forbidden=("runner.cli",),
        why="runner/cli/ is the top of runner/: nothing imports it (cluster/submit.py runs "
        "`python -m runner.cli` by name)",
    ),
    "data": dict(
        where="runner/data/",
        forbidden=("runner", "cluster"),
        allowed=("runner.data", "runner.paths"),
        why="runner/data/ is read by tasks, config and reports and reads none of them",
    ),
    "reports": dict(
        where="runner/report/",
        forbidden=("cluster", "runner.cli", "runner.job", "runner.pipeline", "runner.finish"),
        why="runner/report/ renders the typed Report; it runs nothing",
    ),
    "adapters": dict(
        where="stages/arch/",
        forbidden=("stages",),
        allowed=("stages.arch",),
        why="stages/arch/ is the floor of stages/: every stage reads the adapters, they read no stage",
    ),
    "streaming": dict(
        where="stages/",
        but_not="stages/streaming/",
        forbidden=("stages.streaming",),
        why="the in-memory maths does not lean on the streamed path (cluster/ and runner/ drive it)",
    ),
}
FOLDERS = ("runner/cli", "runner/data", "runner/report", "stages/arch", "stages/streaming")
# the name prefixes the folders replaced: a new module goes into its folder
FLAT_PREFIXES = {
    "runner/cli_": "runner/cli/",
    "runner/report_": "runner/report/",
    "runner/text_": "runner/data/",
    "stages/arch_": "stages/arch/",
    "stages/stream_": "stages/streaming/",
}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imported_names(tree: ast.AST) -> list[tuple[str, int]]:
    """Every absolute import as the dotted names it binds: `from a.b import c` gives a.b.c (c may
    be a module or an attribute; both sit under a.b)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.extend((f"{node.module}.{alias.name}", node.lineno) for alias in node.names)
    return names


def _rule_applies(spec: dict, rel: str) -> bool:
    return rel.startswith(spec["where"]) and not (
        spec.get("but_not") and rel.startswith(spec["but_not"])
    )


def folder_violations(spec: dict, rel: str, tree: ast.AST) -> list[str]:
    """The imports of module `rel` that its folder rule refuses (none where the rule does not
    apply to it)."""
    if not _rule_applies(spec, rel):
        return []
    return [
        f"{rel}:{line} imports {name}"
        for name, line in _imported_names(tree)
        if _under(name, spec["forbidden"]) and not _under(name, spec.get("allowed", ()))
    ]


@pytest.mark.parametrize("rule", sorted(FOLDER_RULES))
def test_folders_keep_their_place(rule):
    spec = FOLDER_RULES[rule]
    paths = [p for p in _modules(spec["where"].split("/")[0]) if _rule_applies(spec, _rel(p))]
    assert paths, f"no module under {spec['where']}: the rule checks nothing"
    problems = [
        v for p in paths for v in folder_violations(spec, _rel(p), ast.parse(p.read_text()))
    ]
    assert not problems, spec["why"] + ":\n" + "\n".join(problems)


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_folder_is_a_package_the_rules_read(folder):
    modules = [_rel(p) for p in _modules(folder.split("/")[0]) if _rel(p).startswith(folder + "/")]
    assert f"{folder}/__init__.py" in modules
    assert len(modules) > 1, f"{folder}/ holds no module besides __init__.py"


def test_no_name_prefix_does_the_work_of_a_folder():
    stray = [
        f"{_rel(path)} (belongs in {folder})"
        for package in PACKAGES
        for path in _modules(package)
        for prefix, folder in FLAT_PREFIXES.items()
        if _rel(path).startswith(prefix)
    ]
    assert not stray, "modules beside their folder:\n" + "\n".join(stray)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_are_absolute(package):
    relative = [
        f"{_rel(path)}:{node.lineno}"
        for path in _modules(package)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert not relative, "relative imports (the layering rules cannot see them):\n" + "\n".join(
        relative
    )


@pytest.mark.parametrize(
    ("rule", "rel", "source"),
    [
        ("the command line", "runner/job.py", "from runner.cli.main import main"),
        ("the command line", "runner/batch.py", "import runner.cli.batch as cli_batch"),
        ("data", "runner/data/bearing.py", "from runner.config import load_config"),
        ("data", "runner/data/corpora.py", "import cluster.executor"),
        ("reports", "runner/report/job.py", "from runner import pipeline"),
        ("adapters", "stages/arch/llama.py", "from stages import importance"),
        ("adapters", "stages/arch/base.py", "def f():\n    from stages.checkpoint import X"),
        ("streaming", "stages/checkpoint.py", "from stages.streaming.lazy_weights import X"),
    ],
)
def test_the_folder_rules_see_each_form(rule, rel, source):
    assert folder_violations(FOLDER_RULES[rule], rel, ast.parse(source))


@pytest.mark.parametrize(
    ("rule", "rel", "source"),
    [
        ("the command line", "runner/cli/main.py", "import runner.cli.batch as cli_batch"),
        ("data", "runner/data/corpora.py", "from runner.paths import cache_root"),
        ("data", "runner/data/text_sources.py", "from runner.data import corpora"),
        ("adapters", "stages/arch/bert.py", "from stages.arch.base import ArchAdapter"),
        ("streaming", "stages/streaming/worker.py", "from stages.streaming import layer_view"),
        ("streaming", "stages/checkpoint.py", "from stages.stage_plan import plan_stage"),
    ],
)
def test_the_folder_rules_let_their_own_imports_pass(rule, rel, source):
    assert folder_violations(FOLDER_RULES[rule], rel, ast.parse(source)) == []


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
