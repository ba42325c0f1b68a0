"""Reading job, compare and family files: bytes -> text -> YAML -> a mapping with `--set`
overrides applied, each failure a `ConfigError` that names the file and what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A job file (or override) is invalid; `problems` holds (yaml_path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """--set a.b.0.c=value; value parsed as YAML. Unknown paths are created and then rejected by validation."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append((f"--set {item}", "expected KEY=VALUE"))
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            problems.append((f"--set {key}", f"value is not valid YAML: {exc}"))
            continue
        node: Any = raw
        parts = key.split(".")
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        except (ValueError, IndexError, TypeError, AttributeError):
            problems.append((key, "override path does not exist in the config"))
    if problems:
        raise ConfigError(problems, "overrides")
    return raw


def read_config_text(path: Path) -> str:
    """A job file's text, or a ConfigError naming why it cannot be read (missing, unreadable,
    not UTF-8)."""
    if path.is_dir():
        raise ConfigError([("", "is a directory, not a job file")], str(path))
    if not path.is_file():
        raise ConfigError([("", f"config file not found: {path}")], str(path))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            [("", f"cannot read the file ({exc.strerror or exc}); check its permissions")],
            str(path),
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [("", f"not UTF-8 text (byte {exc.start}: 0x{data[exc.start]:02x}); save it as UTF-8")],
            str(path),
        ) from None


MAX_DEPTH = 64  # a job file is a few levels deep; 100,000 nested '[' overflowed the parser


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML requires unique keys;
    PyYAML silently keeps the last, so `target` written twice lost the first one)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"duplicate key {key_node.value!r} (first given at line {seen[key]}); "
                        "keep one of them",
                        key_node.start_mark,
                    )  # fmt: skip
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _too_deep(value: Any) -> bool:
    """Nested deeper than MAX_DEPTH (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file's content (None when empty), or a ConfigError naming why it cannot be read."""
    path = Path(path)
    text = read_config_text(path)
    deep = ConfigError(
        [("", f"nested more than {MAX_DEPTH} levels deep; not a job file")], str(path)
    )
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(
            [("", f"malformed YAML at {where}: {getattr(exc, 'problem', exc)}")], str(path)
        ) from None
    except RecursionError:
        raise deep from None
    if _too_deep(value):
        raise deep
    return value


def read_yaml_mapping(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A YAML file that must hold a mapping (job, compare, family), `--set` overrides applied."""
    raw = read_yaml_file(path)
    raw = raw if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(
            [("", f"expected a mapping at the top level, got {type(raw).__name__}")], str(path)
        )
    return apply_overrides(raw, overrides) if overrides else raw
