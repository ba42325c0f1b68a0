"""`cascade validate CHECKPOINT --device NAME`: does a checkpoint fit an edge device?

Exit status: 0 fits, 3 does not fit (measured peak or analytic estimate above the budget, or
out of memory under the budget on CUDA), 2 bad input (unknown device, unreadable checkpoint,
conflicting options, failed measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runner.devices import DeviceError
from runner.paths import shown_lines
from runner.validate import ProbeError, validate_checkpoint
from stages.arch import UnsupportedArchitecture
from stages.atomic import dumps_finite
from stages.checkpoint import CheckpointError

EXIT_FITS = 0
EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3
GIB = 1024**3


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `validate` sub-command to a `cascade` sub-parser set."""
    parser = subparsers.add_parser(
        "validate",
        help="check a pruned checkpoint against an edge device memory budget",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="checkpoint directory (cascade output or plain HF)")
    parser.add_argument("--device", required=True, help="device profile name or YAML path")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--fraction", type=float, help="share of the device's usable memory")
    amount.add_argument("--budget-bytes", type=int, help="explicit budget in bytes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, help="default: the model's positions, at most 128")
    parser.add_argument("--dtype", help="inference dtype (default: the checkpoint's)")
    parser.add_argument("--dense", help="dense checkpoint to compare against (measured too)")
    parser.add_argument("--analytic-only", action="store_true", help="skip the measured run")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 manifest check of cascade checkpoints (the output says so)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=cmd_validate)
    return parser


KNOWN_INPUT_ERRORS = (
    DeviceError,
    CheckpointError,
    UnsupportedArchitecture,
    ProbeError,
    ValueError,
    OSError,
)


def _default_seq_len(checkpoint: str, cap: int = 128) -> int:
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return cap  # the validation itself reports the unreadable checkpoint
    if not isinstance(config, dict):
        return cap
    positions = config.get("n_positions") or config.get("max_position_embeddings") or cap
    return min(cap, int(positions))


def cmd_validate(args) -> int:
    if args.seq_len is None:
        args.seq_len = _default_seq_len(args.checkpoint)
    if args.batch < 1 or args.seq_len < 1:
        print("error: --batch and --seq-len must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = validate_checkpoint(
            args.checkpoint,
            args.device,
            fraction=args.fraction,
            budget_bytes=args.budget_bytes,
            batch=args.batch,
            seq_len=args.seq_len,
            dense_path=args.dense,
            measure=not args.analytic_only,
            dtype=args.dtype,
            verify=not args.no_verify,
        )
    except KNOWN_INPUT_ERRORS as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {shown_lines(str(exc).strip().splitlines()[0])}", file=sys.stderr)
        return EXIT_BAD_INPUT
    result["verified"] = not args.no_verify
    print(dumps_finite(result, "stdout", indent=1) if args.json else format_table(result))
    return EXIT_FITS if result["fits"] else EXIT_DOES_NOT_FIT


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.3f} GiB"


def _num(value, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def _pct(value) -> str:
    return "-" if value is None else f"-{value:.1%}" if value >= 0 else f"+{-value:.1%}"


def format_table(result: dict) -> str:
    """Human-readable summary of a validate_checkpoint result."""
    w = result["workload"]
    verdict = "FITS" if result["fits"] else ("OUT OF MEMORY" if result["oom"] else "DOES NOT FIT")
    rows = [
        ("device", result["device"]),
        ("workload", f"batch {w['batch']} x seq {w['seq_len']} ({w['dtype']})"),
        ("budget", _gib(result["budget_bytes"])),
        (
            "peak (measured)",
            f"{_gib(result['measured_peak_bytes'])} on {result['measured_on'] or '-'}",
        ),
        ("peak (analytic)", _gib(result["analytic_bytes"])),
        ("headroom", _gib(result["headroom_bytes"])),
        ("verdict", f"{verdict} (basis: {result['fits_basis']})"),
    ]
    if result.get("verified") is False:
        rows.insert(
            0, ("integrity", "NOT VERIFIED (--no-verify): files not checked against manifest")
        )
    if result.get("measure_note"):
        rows.append(("note", result["measure_note"]))
    lines = [f"{k:<18} {v}" for k, v in rows]
    lat, red = result["latency_ms"], result["reductions"]
    both_measured = (
        result["dense_peak_source"] == "measured" and result["measured_peak_bytes"] is not None
    )
    pruned_peak = result["peak_bytes"] if both_measured else result["analytic_bytes"]
    pairs = [
        (
            "peak memory" + ("" if both_measured else " (analytic)"),
            _gib(
                result["dense_peak_bytes"]
                if both_measured
                else (result["analytic"]["dense"] or {}).get("total")
            ),
            _gib(pruned_peak),
            _pct(red["peak_memory"]),
        ),
        ("latency", _num(lat["dense"], " ms"), _num(lat["pruned"], " ms"), _pct(red["latency"])),
    ]
    for key, label in (
        ("tokens_per_s", "decode tok/s bound"),
        ("tokens_per_s_realistic", "decode tok/s x0.6"),
        ("samples_per_s", "samples/s bound"),
    ):
        values = result[f"projected_{key}"]
        pairs.append((label, _num(values["dense"]), _num(values["pruned"]), ""))
    lines.append("")
    lines.append(f"{'':<20}{'dense':>16}{'pruned':>16}{'change':>10}")
    lines += [f"{name:<20}{d:>16}{p:>16}{c:>10}" for name, d, p, c in pairs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (python -m runner.cli.validate ...), same as `cascade validate`."""
    parser = argparse.ArgumentParser(prog="cascade")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["validate", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
