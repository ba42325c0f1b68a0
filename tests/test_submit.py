"""Ray Jobs submission: request shapes and token handling (fake client), then a real local head."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster import orphans, submit
from cluster.submit import (
    EXCLUDES,
    SubmitError,
    build_entrypoint,
    make_job_id,
    resolve_token,
    submit_job,
)
from runner.cli import cluster as cli_cluster
from runner.cli.cluster import register

ROOT = Path(__file__).resolve().parents[1]
TINY_JOB = {
    "name": "submit-test",
    "seed": 0,
    "models": ["demo-tiny-gpt2"],
    "data": {"samples_per_class_per_load": 4, "window": 1024, "calibration_size": 16},
    "calibration": {"batch_size": 8},
    "stages": [
        {"kind": "layers", "criterion": "block_influence", "count": 1},
        {"kind": "recover", "steps": 3, "batch_size": 8},
    ],
    "sia": {"enabled": False},
    "output": {"plots": False, "progress": False, "save_stage_models": False},
}


@pytest.fixture
def job_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_JOB))
    return path


class FakeClient:
    """Records what the SDK would send; stands in for ray.job_submission.JobSubmissionClient."""

    calls: list = []

    def __init__(self, address, headers=None):
        FakeClient.calls.append(("init", address, headers))

    def submit_job(self, **kwargs):
        FakeClient.calls.append(("submit", kwargs))
        return kwargs["submission_id"]


@pytest.fixture
def fake_client(monkeypatch):
    import ray.job_submission

    FakeClient.calls = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    return FakeClient


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cascade")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_submit_sends_project_config_and_bearer_token(job_file, fake_client, tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    code = cli(["submit", str(job_file), "--address", "http://head:8265", "--token-file",
                str(token_file), "--set", "stages.1.steps=2", "--output-root", "/data/runs"])  # fmt: skip
    assert code == 0
    (_, address, headers), (_, sent) = fake_client.calls
    assert address == "http://head:8265"
    assert headers == {"Authorization": "Bearer s3cret-token"}
    job_id = sent["submission_id"]
    assert job_id.startswith("cascade-submit-test-")
    env = sent["runtime_env"]
    assert env["working_dir"] == str(ROOT)
    assert set(EXCLUDES) >= {".venv", "runs", ".git", "**/__pycache__", "benchmarks/results"}
    assert env["excludes"] == EXCLUDES
    assert yaml.safe_load(env["env_vars"][submit.CONFIG_ENV]) == TINY_JOB
    assert sent["entrypoint"] == (
        f"python -m runner.cli run-submitted /data/runs/{job_id} --set stages.1.steps=2"
    )
    out = capsys.readouterr().out
    assert f"/data/runs/{job_id}" in out and "s3cret" not in out


def test_token_from_environment_and_file_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert resolve_token(None) == "from-env"
    (tmp_path / "t").write_text("from-file")
    assert resolve_token(tmp_path / "t") == "from-file"  # the file wins
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert resolve_token(None) is None
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(SubmitError, match="empty"):
        resolve_token(tmp_path / "empty")
    with pytest.raises(SubmitError, match="cannot read"):
        resolve_token(tmp_path / "missing")


def test_invalid_config_and_unreachable_server_are_one_line_errors(job_file, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY_JOB, "seed": "not-a-number"}))
    assert cli(["submit", str(bad), "--address", "http://127.0.0.1:9"]) == 2
    assert "seed" in capsys.readouterr().err
    port = free_ports(1)[0]
    with pytest.raises(
        SubmitError, match=f"cannot reach the Ray job server at http://127.0.0.1:{port}"
    ):
        submit_job(job_file.read_text(), "tiny", f"http://127.0.0.1:{port}", token="tok")
    assert cli(["status", "some-job", "--address", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach") and len(err.strip().splitlines()) == 1


def test_job_ids_and_entrypoints_are_shell_safe():
    job_id = make_job_id("my job; rm -rf /")
    assert job_id.startswith("cascade-my-job-rm-rf-") and " " not in job_id
    entry = build_entrypoint(job_id, "~/runs", ["--set", "name=a b"])
    assert entry.endswith("'name=a b'")


def test_job_side_joins_the_jobs_cluster_unless_the_config_names_one(monkeypatch, tmp_path):
    from runner.config import load_config

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    extra = cli_cluster._join_job_cluster(yaml.safe_dump(TINY_JOB))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(TINY_JOB))
    assert load_config(path, [extra[1]]).cluster.address == "10.0.0.1:6379"
    named = {**TINY_JOB, "cluster": {"address": "other:6379"}}
    assert cli_cluster._join_job_cluster(yaml.safe_dump(named)) == []
    monkeypatch.delenv("RAY_ADDRESS")
    assert cli_cluster._join_job_cluster(yaml.safe_dump(TINY_JOB)) == []


# ---- a real local Ray head with the dashboard's job server ---------------------------------------
def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _installed() -> bool:
    """launch.sh's set-up stamp matches pyproject.toml: `./launch.sh cluster` will install nothing."""
    stamp = ROOT / ".venv" / ".installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return stamp.is_file() and stamp.read_text().strip() == want


def _user_shell_env() -> dict:
    """The environment of a plain shell: no venv activated (its bin dir is not on PATH), no
    RAY_ADDRESS, nothing this test process set up for itself."""
    venv_bins = {str(Path(sys.executable).parent), str(ROOT / ".venv" / "bin")}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p not in venv_bins]
    env = {k: os.environ[k] for k in ("HOME", "USER", "LANG", "TMPDIR") if k in os.environ}
    env["PATH"] = os.pathsep.join(path)
    return env


@pytest.fixture
def launched_head(tmp_path):
    """A head started as the README says, `./launch.sh cluster`, from a plain shell; on its own
    ports and temp dir (other Ray instances on this machine are left alone). Stopped by stopping
    every process that names its temp dir (cluster.orphans), never by `ray stop`, which would
    stop every Ray on the machine."""
    if not _installed():
        pytest.skip("needs ./launch.sh setup first (the test must not install anything)")
    temp_dir = tempfile.mkdtemp(prefix="rsub", dir="/tmp")  # short: Ray's socket paths are short
    gcs, dash, client, agent, agent_grpc, metrics, env_agent = free_ports(7)
    args = ["--port", str(gcs), "--dashboard-port", str(dash), "--num-cpus", "2",
            "--temp-dir", temp_dir, "--ray-client-server-port", str(client),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(env_agent),
            "--disable-usage-stats"]  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        started = subprocess.run(
            [str(ROOT / "launch.sh"), "cluster", *args], cwd=tmp_path, env=_user_shell_env(),
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        _wait_for_job_server(address, Path(temp_dir))
        yield address
    finally:
        orphans.terminate_session(temp_dir, grace_s=5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_server(address: str, temp_dir: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"Ray job server at {address} did not answer in {timeout_s}s (logs in {temp_dir})")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.own_cluster
def test_launch_sh_cluster_then_submit_succeeds_from_a_plain_shell(
    launched_head, job_file, tmp_path
):
    """The README's flow: `./launch.sh cluster`, then `./launch.sh submit CONFIG`, no venv active.
    The entrypoint runs `python` from the head's PATH: it must be the project's venv."""
    root = tmp_path / "runs"
    env = _user_shell_env() | {"RAY_ADDRESS": launched_head}
    if os.environ.get("PYTHONPATH"):  # a worktree run: submit (and upload) this tree's code
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    done = subprocess.run(
        [str(ROOT / "launch.sh"), "submit", str(job_file), "--set", "stages.1.steps=2",
         "--output-root", str(root), "--follow"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    logs = done.stdout + done.stderr
    assert done.returncode == 0, logs[-3000:]  # --follow: 0 only when the job SUCCEEDED
    (job_id,) = [
        line.split()[2] for line in done.stdout.splitlines() if line.startswith("submitted")
    ]
    assert submit.job_status(job_id, launched_head) == "SUCCEEDED"
    out = root / job_id
    assert f"job outputs -> {out}" in logs
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["params"] < report["final"]["dense_params"]
    resolved = yaml.safe_load((out / "job.yaml").read_text())
    assert resolved["stages"][1]["steps"] == 2  # --set applied
    assert resolved["cluster"]["address"]  # Ray work inside the job joins the job's cluster
    assert (out / "checkpoint" / "manifest.json").is_file()
    assert submit.stop_job(job_id, launched_head) is False  # already finished


def test_a_server_that_never_answers_and_a_fifo_token_file_do_not_hang(
    monkeypatch, tmp_path, capsys
):
    """A listener that accepts connections and never replies: status gives up after the read
    timeout with one line; a FIFO as --token-file is refused without opening it."""
    monkeypatch.setattr(submit, "HTTP_READ_S", 0.5)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes connections; nobody ever reads or answers
    address = f"http://127.0.0.1:{silent.getsockname()[1]}"
    codes: list[int] = []
    try:
        caller = threading.Thread(
            target=lambda: codes.append(cli(["status", "j", "--address", address]))
        )
        caller.start()
        caller.join(timeout=60)
        assert not caller.is_alive(), "cascade status hung on a server that never answers"
    finally:
        silent.close()
    err = capsys.readouterr().err.strip()
    assert codes == [2] and len(err.splitlines()) == 1
    assert f"the Ray job server at {address} did not answer within 0.5 s" in err

    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    with pytest.raises(SubmitError, match="is a named pipe \\(FIFO\\), not a file"):
        resolve_token(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (submit.MAX_TOKEN_BYTES + 1))
    with pytest.raises(SubmitError, match="larger than"):
        resolve_token(big)
