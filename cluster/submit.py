"""Run a cascade job on a Ray cluster through the Ray Jobs API: submit, status, logs, stop.

The project directory travels as the job's working_dir (without .venv, runs, .git, caches and
benchmark results) and the config travels as text in an environment variable, so a config file
outside the project works too. On the cluster the job runs the `cascade` entry point by name,
`python -m runner.cli run-submitted OUTPUT ...`, and writes to OUTPUT = <output root>/<job id> on
the node running the entrypoint (the head node; default root ~/cascade-runs). This module never
imports the runner: the caller validates the config before submitting it. A token, from
--token-file or $RAY_AUTH_TOKEN, is sent as an Authorization header and never printed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import stat
import sys
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
MAX_TOKEN_BYTES = 64 * 1024
HTTP_CONNECT_S = 10.0  # per request: connecting, then waiting for each answer (not log streaming)
HTTP_READ_S = 60.0


class SubmitError(ValueError):
    """A Ray Jobs request cannot be made or failed (the message names the address or job)."""


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def resolve_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The bearer token from `token_file`, else $RAY_AUTH_TOKEN, else None."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            kind = _file_kind(path.stat().st_mode)
            if kind != "file":  # a FIFO or a device would block the read, or never end
                raise SubmitError(f"--token-file {path}: is a {kind}, not a file holding a token")
            with open(path, "rb") as handle:
                data = handle.read(MAX_TOKEN_BYTES + 1)
        except SubmitError:
            raise
        except OSError as err:
            raise SubmitError(f"--token-file {path}: cannot read it ({err.strerror})") from None
        except ValueError:  # a NUL byte in the name
            raise SubmitError(f"--token-file {str(path)[:80]!r}: not a file name") from None
        if len(data) > MAX_TOKEN_BYTES:
            raise SubmitError(
                f"--token-file {path}: larger than {MAX_TOKEN_BYTES} bytes; it must hold one token"
            )
        token = data.decode("utf-8").strip()
        if not token:
            raise SubmitError(f"--token-file {path}: file is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _file_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    return "named pipe (FIFO)" if stat.S_ISFIFO(mode) else "device or socket"


def _client(address: str, token: str | None):
    import requests  # lazy: only cluster commands need it (the CLI imports this module always)
    from ray.job_submission import JobSubmissionClient  # lazy: only cluster commands need it

    class TimedClient(JobSubmissionClient):
        """The SDK sends every request without a timeout: a server that accepts the connection
        and never answers would hang the command forever."""

        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", (HTTP_CONNECT_S, HTTP_READ_S))
            try:
                return super()._do_request(method, endpoint, **kwargs)
            except requests.Timeout:
                raise SubmitError(
                    f"the Ray job server at {address} did not answer within {HTTP_READ_S:g} s "
                    "(is it a Ray dashboard? is the head overloaded?)"
                ) from None

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return TimedClient(address, headers=headers)
    except SubmitError:
        raise
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


def build_entrypoint(
    job_id: str, output_root: str, extra_args: Sequence[str], python: str = "python"
) -> str:
    output = output_dir(job_id, output_root)
    return shlex.join([python, "-m", "runner.cli", "run-submitted", output, *extra_args])


def submit_job(
    config_text: str,
    job_name: str,
    address: str,
    *,
    extra_args: Sequence[str] = (),
    token: str | None = None,
    output_root: str = DEFAULT_OUTPUT_ROOT,
    python: str = "python",
) -> str:
    """Submit an already validated job file's text; return the job id (= output folder name)."""
    job_id = make_job_id(job_name)
    runtime_env = {
        "working_dir": str(project_root()),
        "excludes": list(EXCLUDES),
        "env_vars": {
            CONFIG_ENV: config_text,
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
