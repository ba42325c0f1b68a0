"""`cascade batch FAMILY.yaml`: compress every model of a family (see configs/families/)."""

from __future__ import annotations

import argparse

from runner.batch import load_family, run_batch
from runner.config import ConfigError
from runner.progress import make_logger
from runner.report.model import FamilySummary


def cmd_batch(args: argparse.Namespace) -> int:
    family = load_family(args.family, args.set)
    if args.concurrency is not None:
        if args.concurrency < 1:
            raise ConfigError([("--concurrency", "must be >= 1")], "command line")
        family = family.model_copy(update={"concurrency": args.concurrency})
    out = args.output or f"runs/{family.name}"
    executor = "local" if args.local else "auto"
    raw = run_batch(family, out, resume=args.resume, executor=executor, log=make_logger(args.quiet))
    summary = FamilySummary.model_validate(raw)
    counts = summary.counts
    print(
        f"family {family.name}: {counts['done']} compressed, {counts['skipped']} reused, "
        f"{counts['failed']} failed in {summary.seconds:.0f}s -> {out}/family.html"
    )
    for row in summary.models:
        if row.status == "failed":
            print(f"  {row.model}: {row.error}")
    return 1 if counts["failed"] else 0


def register(subparsers) -> None:
    """Called by runner.cli.main.build_parser when this module exists."""
    batch = subparsers.add_parser(
        "batch",
        help="compress every model of a family (one job per model, concurrent on Ray)",
        description="Each model becomes OUT/<model>/ (a normal job directory). Finished models "
        "(report.json present) are skipped, so re-running a killed batch continues it. "
        "Exit status 1 when some model failed (the others still ran).",
    )
    batch.add_argument("family", help="family file (see configs/families/demo.yaml)")
    batch.add_argument("--output", "-o", help="output directory (default runs/<family name>)")
    batch.add_argument(
        "--resume",
        action="store_true",
        help="continue unfinished models after their last finished stage (default: restart them)",
    )
    batch.add_argument("--concurrency", type=int, help="max jobs at once (default: resources)")
    batch.add_argument("--local", action="store_true", help="no Ray: run models one by one")
    batch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    batch.add_argument("--quiet", action="store_true")
    batch.set_defaults(func=cmd_batch)
