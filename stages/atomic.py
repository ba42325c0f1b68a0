"""Writing files and directories so that a crash, a full disk or a racing writer never leaves half.

Every place that writes results (checkpoints, stage directories, caches of trained models, JSON
reports) goes through these two helpers: content is assembled under a temporary sibling name on
the same filesystem and renamed into place only when complete, so a reader sees the old version or
the new one, never a mixture.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data) -> None:
    """`data` as indented JSON at `path` via a fsynced temp file and os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, default=str)
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
