"""Run a cascade job on a Ray cluster through the Ray Jobs API: submit, status, logs, stop.

The project directory travels as the job's working_dir (without .venv, runs, .git, caches and
benchmark results) and the config travels as text in an environment variable, so a config file
outside the project works too. On the cluster the job runs `cascade run` through
`python -m cluster.submit run-job OUTPUT ...` and writes to OUTPUT = <output root>/<job id> on
the node running the entrypoint (the head node; default root ~/cascade-runs). A token, from
--token-file or $RAY_AUTH_TOKEN, is sent as an Authorization header and never printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

EXCLUDES = [
    ".venv",
    "runs",
    ".git",
    "**/__pycache__",
    "benchmarks/results",
    ".ruff_cache",
    ".pytest_cache",
]
CONFIG_ENV = "CASCADE_JOB_CONFIG"
TOKEN_ENV = "RAY_AUTH_TOKEN"
DEFAULT_OUTPUT_ROOT = "~/cascade-runs"
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """A Ray Jobs request cannot be made or failed (the message names the address or job)."""


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def resolve_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The bearer token from `token_file`, else $RAY_AUTH_TOKEN, else None."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise SubmitError(f"--token-file {path}: cannot read it ({err.strerror})") from None
        if not token:
            raise SubmitError(f"--token-file {path}: file is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:  # noqa: BLE001 - connection, auth and version errors alike
        message = str(err).replace(token, "***") if token else str(err)
        raise SubmitError(
            f"cannot reach the Ray job server at {address}: {message.splitlines()[0]}"
        ) from None


def _request(what: str, job_id: str, call: Callable):
    try:
        return call()
    except SubmitError:
        raise
    except Exception as err:  # noqa: BLE001 - the SDK raises RuntimeError/HTTP errors
        raise SubmitError(
            f"{what} {job_id}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None


def make_job_id(config_name: str) -> str:
    """Submission id, also the output folder name: cascade-<config name>-<8 hex>."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "-", config_name).strip("-")[:40] or "job"
    return f"cascade-{slug}-{uuid.uuid4().hex[:8]}"


def output_dir(job_id: str, output_root: str = DEFAULT_OUTPUT_ROOT) -> str:
    return f"{output_root.rstrip('/')}/{job_id}"


def _overrides(extra_args: Sequence[str]) -> list[str]:
    """The KEY=VALUE items of every --set in `extra_args` (validated locally before submitting)."""
    values, args = [], list(extra_args)
    for i, arg in enumerate(args):
        if arg == "--set" and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith("--set="):
            values.append(arg.split("=", 1)[1])
    return values


def build_entrypoint(
    job_id: str, output_root: str, extra_args: Sequence[str], python: str = "python"
) -> str:
    output = output_dir(job_id, output_root)
    return shlex.join([python, "-m", "cluster.submit", "run-job", output, *extra_args])


def submit_job(
    config_path: str | os.PathLike,
    address: str,
    *,
    extra_args: Sequence[str] = (),
    token: str | None = None,
    output_root: str = DEFAULT_OUTPUT_ROOT,
    python: str = "python",
) -> str:
    """Validate the config here, submit it, return the job id (= the output folder's name)."""
    from runner.config import load_config

    path = Path(config_path)
    if not path.is_file():
        raise SubmitError(f"config {path}: no such file")
    cfg = load_config(str(path), _overrides(extra_args))  # ConfigError lists every problem
    job_id = make_job_id(cfg.name)
    runtime_env = {
        "working_dir": str(project_root()),
        "excludes": list(EXCLUDES),
        "env_vars": {
            CONFIG_ENV: path.read_text(),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        },
    }
    client = _client(address, token)
    entrypoint = build_entrypoint(job_id, output_root, extra_args, python)
    return _request(
        "submit",
        job_id,
        lambda: client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id
        ),
    )


def job_status(job_id: str, address: str, *, token: str | None = None) -> str:
    client = _client(address, token)
    return str(_request("status of", job_id, lambda: client.get_job_status(job_id)).value)


def job_message(job_id: str, address: str, *, token: str | None = None) -> str:
    client = _client(address, token)
    return _request("info of", job_id, lambda: client.get_job_info(job_id)).message or ""


def job_logs(
    job_id: str,
    address: str,
    *,
    follow: bool = False,
    token: str | None = None,
    write: Callable[[str], object] = sys.stdout.write,
) -> str:
    """Write the job's logs (following them until the job ends); returns the job's status."""
    client = _client(address, token)
    if not follow:
        write(_request("logs of", job_id, lambda: client.get_job_logs(job_id)))
        return str(_request("status of", job_id, lambda: client.get_job_status(job_id)).value)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    _request("logs of", job_id, lambda: asyncio.run(tail()))
    return wait_for_job(job_id, address, token=token, timeout_s=30)


def wait_for_job(
    job_id: str,
    address: str,
    *,
    token: str | None = None,
    timeout_s: float = 600,
    poll_s: float = 1.0,
) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status."""
    client = _client(address, token)
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(_request("status of", job_id, lambda: client.get_job_status(job_id)).value)
        if status in TERMINAL_STATES:
            return status
        if time.monotonic() > deadline:
            raise SubmitError(f"job {job_id}: still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def stop_job(job_id: str, address: str, *, token: str | None = None) -> bool:
    """Ask the cluster to stop the job; False when it had already finished."""
    client = _client(address, token)
    return bool(_request("stop", job_id, lambda: client.stop_job(job_id)))


def run_job_entry(argv: Sequence[str]) -> int:
    """Cluster side: `run-job OUTPUT [cascade run args...]` with the config text in $CASCADE_JOB_CONFIG."""
    if len(argv) < 2 or argv[0] != "run-job":
        print(
            "usage: python -m cluster.submit run-job OUTPUT [cascade run args...]", file=sys.stderr
        )
        return 2
    text = os.environ.get(CONFIG_ENV)
    if not text:
        print(f"error: ${CONFIG_ENV} is empty: submit jobs with `cascade submit`", file=sys.stderr)
        return 2
    output, extra = os.path.expanduser(argv[1]), list(argv[2:])
    extra += _join_job_cluster(text)
    with tempfile.TemporaryDirectory(prefix="cascade-job-") as tmp:
        config = Path(tmp) / "job.yaml"
        config.write_text(text)
        from runner.cli import main

        print(f"[cascade] job outputs -> {output}", flush=True)
        return main(["run", str(config), "--output", output, *extra])


def _join_job_cluster(config_text: str) -> list[str]:
    """Inside a Ray job, Ray work joins the job's cluster ($RAY_ADDRESS) unless the config names one:
    `ray.init(num_cpus=...)` would refuse to start a second, embedded Ray there."""
    import yaml

    address = os.environ.get("RAY_ADDRESS")
    raw = yaml.safe_load(config_text) or {}
    cluster = raw.get("cluster") if isinstance(raw, dict) else None
    if not address or (isinstance(cluster, dict) and cluster.get("address")):
        return []
    return ["--set", f"cluster.address={json.dumps(address)}"]  # quoted: read as YAML


if __name__ == "__main__":
    sys.exit(run_job_entry(sys.argv[1:]))
