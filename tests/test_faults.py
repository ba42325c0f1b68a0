"""Faults survived: a SIGKILLed driver resumes to the identical checkpoint; a full disk at export
keeps the previous checkpoint intact and reports the error."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_job

from runner.cli.main import main
from runner.config import parse_config
from runner.errors import JobError
from runner.job import run_job
from runner.run_lock import LOCK_NAME
from stages.checkpoint import load_pruned, verify_manifest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    run_job(parse_config(tiny_job()), out, log=lambda m: None)
    return out


def events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    sa, sb = load_pruned(a).state_dict(), load_pruned(b).state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def start_and_signal(raw: dict, tmp_path: Path, at, sig: int, stderr: list | None = None) -> Path:
    """Run the job in a child process, send `sig` once an event matches `at`; returns OUT (and
    appends what the child wrote to stderr to `stderr`)."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "runner.cli", "run", str(job), "-o", str(out), "--quiet"]
    # One intra-op thread like this process (conftest): matmul reductions split over two threads
    # round differently (measured: 4e-9 apart), and the comparisons below are bit-exact.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if any(at(e) for e in events(out)):
                break
            if proc.poll() is not None:
                pytest.fail(
                    f"job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
                )
            time.sleep(0.05)
        else:
            pytest.fail("job never reached the event to be killed at")
        proc.send_signal(sig)
    finally:
        proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert proc.returncode == -sig, err[-2000:]  # a shell says 128 + sig
    if stderr is not None:
        stderr.append(err)
    assert not (out / "checkpoint").exists()
    return out


def test_sigkilled_driver_resumes_to_the_identical_checkpoint(tmp_path, reference, capsys):
    out = start_and_signal(
        tiny_job(),
        tmp_path,
        lambda e: e["event"] == "prune" and e["stage"] == "heads",
        signal.SIGKILL,
    )
    # config-edit case: OUT/job.yaml edited, then resumed from it; the finished stages were made
    # with target.ratio 2.0, so resuming would mix two configs: refused, nothing changed
    job = out / "job.yaml"
    original = job.read_text()
    job.write_text(original.replace("ratio: 2.0", "ratio: 1.4", 1))
    before = sorted(p.name for p in (out / "stages").iterdir())
    code = main(["run", str(job), "-o", str(out), "--resume", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "target.ratio 2.0 -> 1.4" in err, err
    assert sorted(p.name for p in (out / "stages").iterdir()) == before
    job.write_text(original)
    run_job(parse_config(tiny_job()), out, resume=True, log=lambda m: None)
    assert "resume" in [e["event"] for e in events(out)]
    assert_same_checkpoint(out / "checkpoint", reference / "checkpoint")


def kd_job() -> dict:
    """tiny_job with kd recovers from the pre-stage model; the one after heads runs 150 steps, a
    wide window to stop it in."""
    raw = tiny_job()
    for stage in raw["stages"]:
        if stage["kind"] == "recover":
            stage |= {"loss": "kd", "teacher": "pre_stage"}
    raw["stages"][3]["steps"] = 150
    return raw


def test_sigtermed_kd_recover_resumes_to_the_clean_checkpoint(tmp_path):
    """SIGTERM in the middle of a kd recover: --resume must distil from the stored pre-stage model
    (not from the pruned model itself) and end with the clean run's checkpoint."""
    clean = tmp_path / "clean"
    run_job(parse_config(kd_job()), clean, log=lambda m: None)
    out = start_and_signal(
        kd_job(), tmp_path, lambda e: e["event"] == "recover_start" and e["stage"] == "recover2",
        signal.SIGTERM,
    )  # fmt: skip
    logs: list[str] = []
    run_job(parse_config(kd_job()), out, resume=True, log=logs.append)
    (resumed,) = [e for e in events(out) if e["event"] == "resume"]
    assert resumed["after_stage"] == "heads", "stopped outside the kd recover: widen its window"
    assert any("pre_stage teacher rebuilt" in m for m in logs), logs
    assert_same_checkpoint(out / "checkpoint", clean / "checkpoint")


def test_disk_full_during_export_keeps_the_previous_checkpoint(tmp_path, reference, monkeypatch):
    import shutil

    out = tmp_path / "job"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    import stages.checkpoint as checkpoint

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", no_space)
    with pytest.raises(JobError, match="No space left on device"):
        run_job(parse_config(tiny_job()), out, resume=True, log=lambda m: None)
    after = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    assert after == before
    verify_manifest(out / "checkpoint")
    assert events(out)[-1]["event"] == "error" and events(out)[-1]["stage"] == "export"
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME], (
        "temporary export dirs left behind"
    )


@pytest.mark.ray
def test_sigterm_with_the_ray_executor_ends_like_a_local_job(tmp_path):
    """Ray's runtime used to abort the driver on SIGTERM with a C++ stack dump (exit 134): the
    driver now unwinds, shuts Ray down and ends as a SIGTERMed process (exit 143 in a shell)."""
    raw = tiny_job(cluster={"executor": "ray", "workers": 1}, sia={"enabled": False})
    err: list[str] = []
    out = start_and_signal(raw, tmp_path, lambda e: e["event"] == "barrier", signal.SIGTERM, err)
    assert "SIGTERM received" not in err[0] and "Aborted" not in err[0], err[0][-2000:]
    assert not (out / ".ray_session.json").exists()  # shut down, not left for the next run to reap
