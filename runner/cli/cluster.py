"""`cascade submit | status | logs | stop`: a job on a Ray cluster through the Ray Jobs API.

runner/cli/main.py calls `register(subparsers)`. Errors print one line (cause + where) and exit 2;
`submit --follow` and `logs --follow` exit 0 only when the job SUCCEEDED (1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

from cluster.submit import (
    CONFIG_ENV,
    DEFAULT_OUTPUT_ROOT,
    SubmitError,
    job_logs,
    job_message,
    job_status,
    output_dir,
    resolve_token,
    stop_job,
    submit_job,
)
from runner.config import ConfigError, load_config
from runner.config_files import read_config_text
from runner.paths import shown_lines

EXIT_ERROR = 2


def _address(args) -> str:
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise _usage("--address is required (e.g. http://127.0.0.1:8265) or set RAY_ADDRESS")
    return address


def _usage(message: str):
    return SubmitError(message)


def _token(args) -> str | None:
    try:
        return resolve_token(args.token_file)
    except UnicodeDecodeError:
        raise SubmitError(
            f"--token-file {args.token_file}: not UTF-8 text; it must hold the token as one line"
        ) from None


def _followed(job_id: str, address: str, token: str | None) -> int:
    status = job_logs(job_id, address, follow=True, token=token)
    print(f"\njob {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def cmd_submit(args) -> int:
    cfg = load_config(args.config, args.set)  # every problem listed here, before submitting
    text = read_config_text(Path(args.config))
    address, token = _address(args), _token(args)
    extra = [item for pair in args.set for item in ("--set", pair)]
    if args.quiet:
        extra.append("--quiet")
    job_id = submit_job(
        text,
        cfg.name,
        address,
        extra_args=extra,
        token=token,
        output_root=args.output_root,
        python=args.python,
    )
    print(f"submitted job {job_id} to {address}")
    print(
        f"outputs: {output_dir(job_id, args.output_root)} (on the node running the job, the head node)"
    )
    print(f"follow:  cascade logs {job_id} --address {address} --follow", flush=True)
    return _followed(job_id, address, token) if args.follow else 0


def cmd_status(args) -> int:
    address, token = _address(args), _token(args)
    status = job_status(args.job_id, address, token=token)
    message = job_message(args.job_id, address, token=token)
    print(f"{args.job_id}: {status}" + (f" ({message})" if message else ""))
    return 0


def cmd_logs(args) -> int:
    address, token = _address(args), _token(args)
    if args.follow:
        return _followed(args.job_id, address, token)
    job_logs(args.job_id, address, token=token)
    return 0


def cmd_stop(args) -> int:
    stopped = stop_job(args.job_id, _address(args), token=_token(args))
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _guarded(command):
    """One-line errors for the cluster commands (SubmitError, ConfigError) with exit code 2."""

    def run(args) -> int:
        try:
            return command(args)
        except (SubmitError, ConfigError) as exc:
            if getattr(args, "debug", False):
                raise
            print(f"error: {shown_lines(str(exc).strip())}", file=sys.stderr)
            return EXIT_ERROR

    return run


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"
    )
    parser.add_argument(
        "--token-file", help="file holding the cluster's auth token (default: $RAY_AUTH_TOKEN)"
    )


def cmd_run_submitted(args) -> int:
    """Cluster side of `submit`: run the job whose text travelled in $CASCADE_JOB_CONFIG."""
    from runner.cli.main import main  # lazy: runner.cli.main imports this module (registration)

    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise SubmitError(f"${CONFIG_ENV} is empty: submit jobs with `cascade submit`")
    output = os.path.expanduser(args.output)
    extra = list(args.run_args) + _join_job_cluster(text)
    with tempfile.TemporaryDirectory(prefix="cascade-job-") as tmp:
        config = Path(tmp) / "job.yaml"
        config.write_text(text, encoding="utf-8")
        print(f"[cascade] job outputs -> {output}", flush=True)
        return main(["run", str(config), "--output", output, *extra])


def _join_job_cluster(config_text: str) -> list[str]:
    """Inside a Ray job, Ray work joins the job's cluster ($RAY_ADDRESS) unless the config names one:
    `ray.init(num_cpus=...)` would refuse to start a second, embedded Ray there."""
    address = os.environ.get("RAY_ADDRESS")
    try:
        raw = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        return []  # `cascade run` reports the malformed file itself, with its line
    cluster = raw.get("cluster") if isinstance(raw, dict) else None
    if not address or (isinstance(cluster, dict) and cluster.get("address")):
        return []
    return ["--set", f"cluster.address={json.dumps(address)}"]  # quoted: read as YAML


def register(subparsers) -> None:
    """Add submit, status, logs and stop (and the cluster-side run-submitted) to `cascade`."""
    submit = subparsers.add_parser("submit", help="run a job on a Ray cluster (Ray Jobs API)")
    submit.add_argument("config")
    _connection(submit)
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument(
        "--output-root",
        default=DEFAULT_OUTPUT_ROOT,
        help=f"where the job writes <root>/<job id> on the cluster (default {DEFAULT_OUTPUT_ROOT})",
    )
    submit.add_argument("--python", default="python", help="python executable on the cluster")
    submit.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    submit.add_argument("--quiet", action="store_true")
    submit.set_defaults(func=_guarded(cmd_submit))

    status = subparsers.add_parser("status", help="status of a submitted job")
    status.add_argument("job_id")
    _connection(status)
    status.set_defaults(func=_guarded(cmd_status))

    logs = subparsers.add_parser("logs", help="logs of a submitted job")
    logs.add_argument("job_id")
    _connection(logs)
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    logs.set_defaults(func=_guarded(cmd_logs))

    stop = subparsers.add_parser("stop", help="stop a submitted job")
    stop.add_argument("job_id")
    _connection(stop)
    stop.set_defaults(func=_guarded(cmd_stop))

    # What a submitted job's entrypoint runs on the cluster (not for people: no help line).
    submitted = subparsers.add_parser("run-submitted")
    submitted.add_argument("output")
    submitted.add_argument("run_args", nargs=argparse.REMAINDER)
    submitted.set_defaults(func=_guarded(cmd_run_submitted))
