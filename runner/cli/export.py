"""`cascade export CHECKPOINT --format hf|gguf [--dtype f16|bf16|f32] [-o PATH] [--force]`.

hf:   a folder plain transformers loads (uniform, vanilla-expressible layouts only);
      with --remote-code any per-layer layout (Llama / Mistral / Qwen2 causal LMs), loaded
      with trust_remote_code=True through a small modeling file shipped in the folder.
gguf: one .gguf file for llama.cpp (Llama-family causal LMs; per-layer layouts as `deci`).

The checkpoint is checked against its manifest.json first (--no-verify skips that, and says so).
An existing output path is refused unless --force names an earlier export of the same format, and
a path holding the checkpoint (its run directory) or inside it is always refused.
Exit status: 0 written, 2 refused (one line on stderr: cause, path, what to do); nothing is left
behind at the output path on failure.
"""

from __future__ import annotations

import argparse
import sys

from runner.exporters import DTYPES, EXPORT_FORMATS, ExportError, export_checkpoint, get_exporter
from runner.paths import shown_lines

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `export` sub-command to a `cascade` sub-parser set."""

    parser = subparsers.add_parser(
        "export",
        help="export a pruned checkpoint for an inference engine (hf, gguf)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="checkpoint directory (cascade output or plain HF)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="fmt")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="weights dtype (default: gguf f16, hf the checkpoint's)"
    )
    parser.add_argument(
        "-o",
        "--output",
        help="output path (default: beside the checkpoint: NAME-hf/, NAME-DT.gguf)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an earlier export at the output path"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="do not check the checkpoint's manifest.json"
    )
    parser.add_argument(
        "--remote-code",
        action="store_true",
        help="hf: any per-layer layout, with a modeling file in the folder (trust_remote_code)",
    )
    parser.add_argument(
        "--tokenizer-pre",
        help="gguf: llama.cpp pre-tokenizer name when it cannot be recognised (e.g. llama-bpe)",
    )
    parser.set_defaults(func=cmd_export)
    return parser


def cmd_export(args) -> int:

    exporter_options = {}
    if args.tokenizer_pre:
        if args.fmt != "gguf":
            print("error: --tokenizer-pre applies to --format gguf only", file=sys.stderr)
            return EXIT_BAD_INPUT
        exporter_options["tokenizer_pre"] = args.tokenizer_pre
    try:
        exporter = get_exporter(args.fmt, remote_code=args.remote_code, **exporter_options)
        path = export_checkpoint(
            args.checkpoint,
            exporter,
            args.output,
            dtype=args.dtype,
            verify=not args.no_verify,
            force=args.force,
            log=lambda message: print(message, file=sys.stderr),
        )
    except (ExportError, OSError) as exc:
        print(f"error: {shown_lines(str(exc).strip().splitlines()[0])}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(path)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (python -m runner.cli.export ...), same as `cascade export`."""
    parser = argparse.ArgumentParser(prog="cascade")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
