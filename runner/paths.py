"""Where the runner keeps things on disk: the cache root, filesystem-safe directory names, and
names cut to a readable length for messages."""

from __future__ import annotations

import os
import re
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cached demo models, fine-tunes and converted built-ins: `cache_dir`, $CASCADE_CACHE or
    ~/.cache/cascade."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CASCADE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cascade"


def dir_name_for_ref(ref: str) -> str:
    """The default output directory of a model: its ref's last path part, filesystem-safe."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(ref.rstrip("/")).name or ref)
    return name if name.strip(".") else name.replace(".", "_")  # never "." or ".."


def shown(text: str, limit: int = 120) -> str:
    """`text` for a message: whole when short, else its start and end around a count of what
    was cut (a 10 MB job name was echoed whole to stderr)."""
    text = str(text)
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[-(limit // 3) :]
    return f"{head}...[{len(text) - len(head) - len(tail):,} characters]...{tail}"


def shown_lines(message: str, limit: int = 2000) -> str:
    """Every line of an error message cut to `limit` characters (the last guard: whatever value
    a message quotes, the user sees lines, not megabytes)."""
    return "\n".join(shown(line, limit) for line in message.splitlines())
