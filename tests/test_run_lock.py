"""One writer per run directory: a job holds an OS lock on OUT/.job.lock for its whole life; a second
job on that directory (--force and --resume included) is refused in one line and changes nothing;
the kernel releases the lock when the holder dies, so a killed job leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_checks import one_line_error, run_cli, write_job
from conftest import tiny_job

from runner.config import parse_config
from runner.errors import JobError
from runner.job import run_job
from runner.run_lock import LOCK_NAME, clear_run_dir, run_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from runner.run_lock import run_lock\n"
    "with run_lock(Path(sys.argv[1])):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(600)\n"
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/out (as a running job does)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.yaml").write_text("name: running\n")
    (out / "events.jsonl").write_text('{"event": "job_start"}\n')
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield out, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_NAME}


def test_a_second_job_on_a_locked_directory_is_refused_force_and_resume_too(
    holder, tmp_path, capsys
):
    out, proc = holder
    before = contents(out)
    for flags in ({"force": True}, {"resume": True}, {}):
        with pytest.raises(JobError, match=f"in use by another running job \\(pid {proc.pid}\\)"):
            run_job(parse_config(tiny_job()), out, log=lambda m: None, **flags)
    job = write_job(tmp_path / "other.yaml", name="other")
    code, err, _ = run_cli(["run", str(job), "-o", str(out), "--force"], capsys)
    one_line_error(code, err, f"output directory {out} is in use", "choose another output")
    assert len(err.splitlines()) == 1
    assert contents(out) == before  # nothing deleted, nothing written


def test_a_killed_holder_leaves_no_stale_lock(holder):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10  # the kernel drops the lock as the process exits
    while True:
        try:
            with run_lock(out):
                assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
            break
        except JobError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_clear_keeps_only_the_held_lock(tmp_path):
    out = tmp_path / "out"
    with run_lock(out):
        (out / "stages" / "00_x").mkdir(parents=True)
        (out / "job.yaml").write_text("x")
        (out / "link").symlink_to(tmp_path)
        clear_run_dir(out)
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
        with pytest.raises(JobError, match="in use"):  # a second holder in this process too
            with run_lock(out):
                pass
    assert tmp_path.is_dir()  # the symlink's target survives
