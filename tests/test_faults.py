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


def test_sigkilled_driver_resumes_to_the_identical_checkpoint(tmp_path, reference):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job()))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "runner.cli", "run", str(job), "-o", str(out), "--quiet"]
    # One intra-op thread like this process (conftest): matmul reductions split over two threads
    # round differently (measured: 4e-9 apart), and the comparison below is bit-exact.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if any(e["event"] == "prune" and e["stage"] == "heads" for e in events(out)):
                break
            if proc.poll() is not None:
                pytest.fail(
                    f"job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
                )
            time.sleep(0.05)
        else:
            pytest.fail("job never reached the heads stage")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint").exists()
    run_job(parse_config(tiny_job()), out, resume=True, log=lambda m: None)
    assert "resume" in [e["event"] for e in events(out)]
    assert_same_checkpoint(out / "checkpoint", reference / "checkpoint")


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
