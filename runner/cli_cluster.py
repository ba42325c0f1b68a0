"""`cascade submit | status | logs | stop`: a job on a Ray cluster through the Ray Jobs API.

runner/cli.py calls `register(subparsers)`. Errors print one line (cause + where) and exit 2;
`submit --follow` and `logs --follow` exit 0 only when the job SUCCEEDED (1 otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_ERROR = 2


def _address(args) -> str:
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise _usage("--address is required (e.g. http://127.0.0.1:8265) or set RAY_ADDRESS")
    return address


def _usage(message: str):
    from cluster.submit import SubmitError

    return SubmitError(message)


def _token(args) -> str | None:
    from cluster.submit import resolve_token

    return resolve_token(args.token_file)


def _followed(job_id: str, address: str, token: str | None) -> int:
    from cluster.submit import job_logs

    status = job_logs(job_id, address, follow=True, token=token)
    print(f"\njob {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def cmd_submit(args) -> int:
    from cluster.submit import output_dir, submit_job

    address, token = _address(args), _token(args)
    extra = [item for pair in args.set for item in ("--set", pair)]
    if args.quiet:
        extra.append("--quiet")
    job_id = submit_job(
        args.config,
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
    from cluster.submit import job_message, job_status

    address, token = _address(args), _token(args)
    status = job_status(args.job_id, address, token=token)
    message = job_message(args.job_id, address, token=token)
    print(f"{args.job_id}: {status}" + (f" ({message})" if message else ""))
    return 0


def cmd_logs(args) -> int:
    from cluster.submit import job_logs

    address, token = _address(args), _token(args)
    if args.follow:
        return _followed(args.job_id, address, token)
    job_logs(args.job_id, address, token=token)
    return 0


def cmd_stop(args) -> int:
    from cluster.submit import stop_job

    stopped = stop_job(args.job_id, _address(args), token=_token(args))
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _guarded(command):
    """One-line errors for the cluster commands (SubmitError, ConfigError) with exit code 2."""

    def run(args) -> int:
        from cluster.submit import SubmitError
        from runner.config import ConfigError

        try:
            return command(args)
        except (SubmitError, ConfigError) as exc:
            if getattr(args, "debug", False):
                raise
            print(f"error: {str(exc).strip()}", file=sys.stderr)
            return EXIT_ERROR

    return run


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"
    )
    parser.add_argument(
        "--token-file", help="file holding the cluster's auth token (default: $RAY_AUTH_TOKEN)"
    )


def register(subparsers) -> None:
    """Add submit, status, logs and stop to the `cascade` sub-command parser."""
    from cluster.submit import DEFAULT_OUTPUT_ROOT

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
