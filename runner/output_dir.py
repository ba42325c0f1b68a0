"""Output directories of run / compare / batch: created, or refused with ONE line saying what to do.

An `-o` that names a file, a path under a file, a symlink loop or a directory the user cannot write
would otherwise surface as an OSError traceback from deep inside the job (docs/ERRORS.md).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.errors import JobError
from runner.run_lock import run_entries

_CHOOSE = "choose another output directory (-o/--output)"


def _blocking_file(out: Path) -> Path | None:
    """The nearest existing ancestor of `out` (or `out` itself) that is not a directory."""
    for path in (out, *out.parents):
        if path.is_symlink() and not path.exists():
            return path
        if path.exists():
            return None if path.is_dir() else path
    return None


def output_problem(out: Path, exc: OSError) -> str:
    """One line: what is wrong with `out` (from the OSError raised using it) and what to do."""
    blocker = _blocking_file(out)
    if blocker is not None and blocker.is_symlink() and not blocker.exists():
        what = f"{blocker} is a broken symlink or a symlink loop"
        return f"output directory {out}: {what}; remove it or {_CHOOSE}"
    if blocker is not None:
        what = "is a file" if blocker == out else f"is inside {blocker}, which is a file"
        return f"output directory {out} {what}, not a directory; {_CHOOSE}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"output directory {out}: permission denied ({exc.filename or out}); {_CHOOSE} that "
            "you can write to, or fix the permissions of its parent"
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"output directory {out}: no space left on the device; free space or {_CHOOSE}"
    if exc.errno == errno.ELOOP:
        return f"output directory {out}: too many levels of symbolic links; {_CHOOSE}"
    reason = exc.strerror or type(exc).__name__
    return f"output directory {out}: {reason} ({exc.filename or out}); {_CHOOSE}"


@contextmanager
def output_errors(out: Path) -> Iterator[None]:
    """OSErrors from preparing `out` become one JobError line (never a traceback)."""
    if "\0" in str(out):  # the OS calls raise ValueError("embedded null byte") for it
        raise JobError(f"output directory {str(out)[:80]!r} contains a NUL byte; {_CHOOSE}")
    try:
        yield
    except OSError as exc:
        raise JobError(output_problem(Path(out), exc)) from None


def is_empty_or_missing(out: Path) -> bool:
    """No directory at `out` yet, or an empty one (raises OSError for a file or a loop)."""
    if out.is_symlink() and not out.exists():
        raise FileExistsError(errno.EEXIST, "broken symlink", str(out))
    return not out.exists() or not run_entries(out)


def make_output_dir(out: Path) -> None:
    """mkdir -p `out`, or a JobError naming why it cannot be used."""
    with output_errors(out):
        is_empty_or_missing(out)
        out.mkdir(parents=True, exist_ok=True)
