"""Ray Jobs submission: request shapes and token handling (fake client), then a real local head."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster import submit
from cluster.submit import (
    EXCLUDES,
    SubmitError,
    build_entrypoint,
    make_job_id,
    resolve_token,
    submit_job,
)
from runner import cli_cluster
from runner.cli_cluster import register

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


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own process group; stopped by that group's id, not by
    `ray stop` (which would kill every Ray instance on the machine, other test runs' too)."""
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = tempfile.mkdtemp(prefix="rsub", dir="/tmp")  # own temp dir: invisible to ray.init()
    gcs, dash, client, agent, agent_grpc, metrics, env_agent = free_ports(7)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
               PATH=f"{ray_bin.parent}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    cmd = [str(ray_bin), "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dash),
           "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--include-dashboard=true",
           "--num-cpus", "2", "--temp-dir", temp_dir, "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(env_agent),
           "--disable-usage-stats"]  # fmt: skip
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_job_server(address, proc, Path(temp_dir) / "head.log")
        yield address
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):  # the group dies either way
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_server(
    address: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"Ray job server at {address} did not answer in {timeout_s}s:\n{log.read_text()[-3000:]}"
    )


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.own_cluster
def test_submitted_job_succeeds_and_writes_its_report(ray_head, job_file, tmp_path):
    root = tmp_path / "runs"
    job_id = submit_job(
        job_file.read_text(), "tiny", ray_head, extra_args=["--set", "stages.1.steps=2"],
        output_root=str(root),
    )  # fmt: skip
    chunks: list[str] = []
    status = submit.job_logs(job_id, ray_head, follow=True, write=chunks.append)
    logs = "".join(chunks)
    assert status == "SUCCEEDED", logs[-3000:]
    assert submit.job_status(job_id, ray_head) == "SUCCEEDED"
    out = root / job_id
    assert f"job outputs -> {out}" in logs
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["params"] < report["final"]["dense_params"]
    resolved = yaml.safe_load((out / "job.yaml").read_text())
    assert resolved["stages"][1]["steps"] == 2  # --set applied
    assert resolved["cluster"]["address"]  # Ray work inside the job joins the job's cluster
    assert (out / "checkpoint" / "manifest.json").is_file()
    assert submit.stop_job(job_id, ray_head) is False  # already finished
