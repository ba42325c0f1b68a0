"""Writing files and directories so that a crash, a full disk or a racing writer never leaves half.

Every place that writes results (checkpoints, stage directories, caches of trained models, JSON
reports) goes through these two helpers: content is assembled under a temporary sibling name on
the same filesystem and renamed into place only when complete, so a reader sees the old version or
the new one, never a mixture.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finite_json(value: Any, default: Callable[[Any], Any] = str) -> tuple[Any, list[str]]:
    """`value` made of JSON types only, NaN and +-Infinity replaced by null (RFC 8259 has no
    such numbers: Python writes a bare `NaN` other readers reject); returns it and where the
    replacements were (`final.accuracy`, `stages.2.loss`). Other types go through `default`.
    Walked without recursion, so any depth is fine."""
    replaced: list[str] = []
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, str]] = [(value, root, 0, "")]
    while stack:
        item, parent, key, where = stack.pop()
        if isinstance(item, np.generic):
            item = item.item()
        if isinstance(item, float) and not math.isfinite(item):
            replaced.append(where or "<root>")
            item = None
        elif isinstance(item, dict):
            keys = [_json_key(k) for k in item]
            out: Any = dict.fromkeys(keys)  # key order kept: children are filled in place
            stack.extend(
                (v, out, k, f"{where}.{k}" if where else k) for k, v in zip(keys, item.values())
            )
            item = out
        elif isinstance(item, list | tuple):
            out = [None] * len(item)
            stack.extend(
                (v, out, i, f"{where}.{i}" if where else str(i)) for i, v in enumerate(item)
            )
            item = out
        elif item is not None and not isinstance(item, str | int | float | bool):
            stack.append((default(item), parent, key, where))
            continue
        parent[key] = item
    return root[0], sorted(replaced)


def _json_key(key: Any) -> str:
    """A mapping key as json.dumps writes it."""
    if isinstance(key, str):
        return key
    return json.dumps(key) if isinstance(key, bool | int | float) or key is None else str(key)


def dumps_finite(data: Any, what: str, *, default: Callable[[Any], Any] = str, **kwargs) -> str:
    """json.dumps that never writes NaN/Infinity: they become null, with one warning line on
    stderr naming `what` (the file) and where they were."""
    clean, replaced = finite_json(data, default)
    if replaced:
        shown = ", ".join(replaced[:5]) + (
            f" and {len(replaced) - 5} more" if len(replaced) > 5 else ""
        )
        print(
            f"warning: {what}: non-finite numbers (NaN/Infinity) written as null at {shown}",
            file=sys.stderr,
        )
    return json.dumps(clean, allow_nan=False, **kwargs)


def write_json_atomic(path: Path, data) -> None:
    """`data` as indented JSON at `path` via a fsynced temp file and os.replace (NaN/Infinity
    written as null, with a warning: the file stays RFC 8259 JSON)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    text = dumps_finite(data, str(path), indent=1)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename tmp over target; the previous directory survives until the new one is in place."""
    backup = None
    if target.exists():
        if not target.is_dir():
            raise NotADirectoryError(f"{target}: exists and is not a directory")
        backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        if backup is not None:
            os.rename(backup, target)
        raise
    fsync_dir(target.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty sibling temp directory to fill; it becomes `target` when the body succeeds.

    On any failure the temp directory is removed and `target` stays as it was. keep_existing: for
    content-addressed caches, where a concurrent writer of the same entry may win the race: its
    copy is kept and ours dropped. Otherwise an existing `target` is replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if keep_existing and target.exists():
            return
        try:
            _swap_into_place(tmp, target)
        except OSError:
            if not (keep_existing and target.exists()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; a failed write leaves nothing
