"""One writer per run directory: an OS lock held for the whole job.

Two jobs writing one directory mix their stages, events and checkpoints (a `--force` run deleted
a running job's directory, and the running job then wrote its later stages into the new one). So
every job takes an exclusive `flock` on `OUT/.job.lock` before it reads or changes anything in
OUT and keeps it until it ends. The kernel drops the lock when the process dies, however it dies,
so a killed job never leaves a stale lock behind. The file itself is never deleted (deleting a
lock file lets two processes lock two different files of one name); `--force` clears everything
else in the directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.errors import JobError

LOCK_NAME = ".job.lock"


def run_entries(out: Path) -> list[Path]:
    """What `out` holds besides its lock file (a directory holding only the lock is empty)."""
    return [p for p in out.iterdir() if p.name != LOCK_NAME]


def clear_run_dir(out: Path) -> None:
    """Delete everything in `out` except the lock file the caller holds (for --force)."""
    for path in run_entries(out):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@contextmanager
def run_lock(out: Path, log=print) -> Iterator[None]:
    """Create `out` if needed and hold its lock while the body runs; a JobError (one line) when
    another process holds it."""
    fd = _acquire(Path(out), log)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock


def _acquire(out: Path, log) -> int | None:
    for _ in range(5):
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JobError(_in_use(out, path)) from None
            log(
                f"WARNING: cannot lock {path} ({exc.strerror}): this filesystem has no file "
                "locks, so another job started on this directory now would not be refused"
            )
            return None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the directory was deleted and made again after we opened: lock the new one
    raise JobError(f"output directory {out}: it keeps being deleted and recreated; retry")


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _in_use(out: Path, path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8", errors="replace").strip()[:20]
    except OSError:
        pid = ""
    who = f" (pid {pid})" if pid.isdigit() else ""
    return (
        f"output directory {out} is in use by another running job{who}; wait for it to end, "
        "or choose another output directory (-o/--output)"
    )
