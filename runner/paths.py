"""Where the runner keeps things on disk: the cache root and filesystem-safe directory names."""

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
