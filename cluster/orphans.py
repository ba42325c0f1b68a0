"""What a killed driver's embedded Ray left running, found by the session it recorded.

While a job runs on an embedded Ray it started, `recorded_session` keeps <out>/.ray_session.json:
the driver's pid and start time, the host, and Ray's session directory. A driver killed with
SIGKILL never shuts Ray down, and Ray's agents (DashboardAgent, RuntimeEnvAgent) outlive it for
minutes. The next run in that directory calls `reap_orphans` first: when the recorded driver is
gone, every process whose command line or open files name that session directory is terminated
(SIGTERM, then SIGKILL after a grace period). Processes are never chosen by their name, a joined
cluster's session is never recorded, and a live driver's Ray is never touched. Linux only (/proc);
elsewhere nothing is recorded or reaped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages.atomic import write_json_atomic

RECORD = ".ray_session.json"
PROC = Path("/proc")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None: no such process)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and ')'
    return int(fields[19]) if len(fields) > 19 else None


def _parent(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def _names(text: str, session_dir: str) -> bool:
    """`text` names `session_dir` itself or a path inside it (not a longer sibling name)."""
    start = text.find(session_dir)
    while start != -1:
        end = start + len(session_dir)
        if end == len(text) or text[end] in "/ \t\0\"',;:":
            return True
        start = text.find(session_dir, start + 1)
    return False


def _names_session(pid: int, session_dir: str) -> bool:
    """The process's command line or one of its open files names the session directory (Ray's
    agents rename their process title, but keep their session's log files open)."""
    base = PROC / str(pid)
    try:
        if _names(base.joinpath("cmdline").read_bytes().decode(errors="replace"), session_dir):
            return True
        for fd in base.joinpath("fd").iterdir():
            try:
                if _names(os.readlink(fd), session_dir):
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def session_processes(session_dir: str) -> list[int]:
    """Pids (other than this process) whose command line or open files name `session_dir`."""
    own, found = os.getpid(), []
    if not PROC.is_dir() or not session_dir:
        return found
    for entry in PROC.iterdir():
        if entry.name.isdigit() and int(entry.name) != own:
            if _names_session(int(entry.name), session_dir):
                found.append(int(entry.name))
    return sorted(found)


def session_dir_started_here(session_dir: str | None) -> bool:
    """True when this process started that Ray (its GCS or raylet is our child): a joined
    cluster's session must never be recorded, or a later run could reap someone else's Ray."""
    if not session_dir:
        return False
    return any(_parent(pid) == os.getpid() for pid in session_processes(session_dir))


def record_session(out: Path, session_dir: str | None) -> bool:
    """Write the record for an embedded Ray this process started; False when not recorded."""
    out = Path(out)
    if not out.is_dir() or not session_dir_started_here(session_dir):
        return False
    record = {
        "driver_pid": os.getpid(),
        "driver_start": _start_time(os.getpid()),
        "host": socket.gethostname(),
        "session_dir": session_dir,
    }
    write_json_atomic(out / RECORD, record)
    return True


@contextmanager
def recorded_session(cluster_cfg, out: Path) -> Iterator[None]:
    """Inside a job's cluster_session: record the embedded Ray this process started (if any) in
    `out` while the body runs; the record is removed when the body ends, however it ends (a
    SIGKILL is the one way to leave it, which is what it is for)."""
    recorded = cluster_cfg.executor == "ray" and record_session(out, _session_dir())
    try:
        yield
    finally:
        if recorded:
            forget_session(out)


def _session_dir() -> str | None:
    """This driver's Ray session directory (Ray has no public accessor for it)."""
    import ray  # lazy: only jobs on Ray get here, and local jobs must not load it

    if not ray.is_initialized():
        return None
    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_session_dir_path() if node is not None else None


def forget_session(out: Path) -> None:
    """The driver shut its Ray down: nothing to reap."""
    try:
        (Path(out) / RECORD).unlink(missing_ok=True)
    except OSError:
        pass


def _read_record(out: Path) -> dict | None:
    try:
        record = json.loads((Path(out) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("session_dir"), str):
        return None
    return record


def _driver_alive(record: dict) -> bool:
    pid = record.get("driver_pid")
    if not isinstance(pid, int):
        return False
    started = _start_time(pid)
    return started is not None and started == record.get("driver_start")


def _terminate(pids: list[int], grace_s: float) -> None:
    """SIGTERM, then SIGKILL what is still running after `grace_s`; a pid whose start time
    changed meanwhile belongs to a new process and is left alone."""
    started = {pid: _start_time(pid) for pid in pids}
    _signal(started, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while started and time.monotonic() < deadline:
        time.sleep(0.1)
        started = {p: t for p, t in started.items() if _start_time(p) == t and not _zombie(p)}
    _signal(started, signal.SIGKILL)
    deadline = time.monotonic() + grace_s  # SIGKILL is delivered asynchronously: wait for it
    while started and time.monotonic() < deadline:
        started = {p: t for p, t in started.items() if _start_time(p) == t and not _zombie(p)}
        time.sleep(0.05)


def _signal(started: dict[int, int | None], sig: int) -> None:
    for pid, start in started.items():
        if start is None or _start_time(pid) != start:
            continue
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _zombie(pid: int) -> bool:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] == "Z"


def reap_orphans(out: Path, *, grace_s: float = 5.0, log=None) -> list[int]:
    """Terminate what a dead driver's embedded Ray (recorded in `out`) left; returns their pids.

    Does nothing when there is no record, when the recorded driver still runs, or when the record
    comes from another host (its processes are not visible here).
    """
    record = _read_record(Path(out))
    if record is None or record.get("host") != socket.gethostname() or _driver_alive(record):
        return []

    def note(count: int) -> None:
        if log is not None:
            log(
                f"stopping {count} process(es) left by the killed run's Ray session "
                f"{record['session_dir']} (driver pid {record.get('driver_pid')})"
            )

    reaped = terminate_session(record["session_dir"], grace_s=grace_s, on_found=note)
    forget_session(Path(out))
    return reaped


def terminate_session(session_dir: str, *, grace_s: float = 5.0, on_found=None) -> list[int]:
    """Stop every process whose command line or open files name `session_dir` (a Ray session or
    temp directory); returns their pids. `ray stop` would stop every Ray on the machine instead."""
    reaped: list[int] = []
    for _ in range(3):  # a raylet stopped mid-way may have started a worker: look again
        pids = [p for p in session_processes(session_dir) if p not in reaped]
        if not pids:
            break
        if on_found is not None:
            on_found(len(pids))
        _terminate(pids, grace_s)
        reaped += pids
    return reaped
