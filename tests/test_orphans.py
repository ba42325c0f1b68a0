"""A killed driver's embedded Ray: its left-over processes are stopped by the session it recorded
(docs/ERRORS.md)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cluster.orphans import RECORD, reap_orphans, record_session, session_processes

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.own_cluster]
ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
from pathlib import Path
from cluster.executor import cluster_session
from cluster.orphans import recorded_session
from runner.config import ClusterConfig
cfg = ClusterConfig(executor="ray", workers=1)
with cluster_session(cfg), recorded_session(cfg, Path(sys.argv[1])):
    print("ready", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def own_ray_dir(monkeypatch):
    """A private Ray temp dir: never join (or record) a Ray someone else started on this host.
    Short, because Ray's unix sockets live under it (107-byte path limit)."""
    path = tempfile.mkdtemp(prefix="cr", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_killed_drivers_ray_processes_are_reaped_by_its_recorded_session(tmp_path, own_ray_dir):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_TMPDIR=own_ray_dir)
    driver = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert driver.stdout.readline().strip() == "ready"
        session = yaml.safe_load((out / RECORD).read_text())["session_dir"]
        assert session.startswith(own_ray_dir)
        assert reap_orphans(out) == []  # the driver is alive: its Ray is not ours to stop
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    time.sleep(2)
    left = session_processes(session)
    assert left, "nothing outlived the SIGKILLed driver: the test no longer shows the problem"
    messages = []
    assert set(left) <= set(reap_orphans(out, log=messages.append))
    assert session in messages[0]
    assert session_processes(session) == []
    assert not (out / RECORD).exists()


def test_a_joined_or_foreign_session_is_never_recorded(tmp_path):
    """Only a Ray whose processes are children of this driver is recorded."""
    assert record_session(tmp_path, "/tmp/ray/session_someone_elses") is False
    assert record_session(tmp_path, None) is False
    assert not (tmp_path / RECORD).exists()
