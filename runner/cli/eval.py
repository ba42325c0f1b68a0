"""`cascade eval CHECKPOINT [--tasks NAME,...]`: zero-shot accuracy through lm-evaluation-harness.

The checkpoint (any per-layer layout) is loaded with stages.checkpoint.load_pruned and handed to
lm-eval's Hugging Face wrapper as a model instance (`HFLM(pretrained=model, tokenizer=tok)`);
`lm_eval.simple_evaluate` runs task YAML files over local JSONL data, nothing is downloaded.

--tasks takes, comma-separated:
  bearing_qa, cloze       the built-in choice tasks (runner/data/choice_tasks.py), written as lm-eval
                          task files; with the job's settings when the job file is found
                          (CHECKPOINT/../job.yaml or --job), so the items are the ones the job's
                          report scored (cloze needs the job: its items come from the job's
                          held-out test documents)
  a name from the job's evaluation.choice_tasks
  ITEMS.jsonl             a file of {"context", "choices", "label"} lines (our format)
  TASK.yaml               any lm-eval task file over local data (its folder is included)
Default: the job's evaluation.choice_tasks. --write-tasks DIR keeps the generated task files
(`lm_eval --include_path DIR --tasks cascade_bearing_qa` runs them outside cascade).

Contexts are encoded without special tokens (add_bos_token=False, as the job's own scorer does);
--add-bos prepends the tokenizer's BOS. Needs the `eval` extra: pip install 'cascade-runner[eval]'.
Exit status: 0 evaluated, 2 bad input (one line on stderr: cause, where, what to do).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from runner.config import ConfigError, JobConfig, load_config
from runner.data.choice_tasks import BUILTIN_TASKS, ChoiceTaskSpec, choice_examples
from runner.data.lm_eval_tasks import TASK_PREFIX, write_task
from runner.data.text_files import TextDataError
from runner.tasks.causal_lm import bearing_data, job_choice_tasks, job_text_sources, text_splits
from stages.checkpoint import CheckpointError, load_pruned, load_tokenizer

EXIT_OK = 0
EXIT_BAD_INPUT = 2
LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"


class EvalError(ValueError):
    """`cascade eval` cannot run (message: cause, where, what to do)."""


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `eval` sub-command to a `cascade` sub-parser set."""
    parser = subparsers.add_parser(
        "eval",
        help="zero-shot accuracy of a checkpoint through lm-evaluation-harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="checkpoint directory (cascade output or plain HF)")
    parser.add_argument("--tasks", help="comma-separated tasks (default: the job's choice tasks)")
    parser.add_argument("--job", help="the job file (default: CHECKPOINT/../job.yaml if present)")
    parser.add_argument("--limit", type=int, help="at most this many items per built-in task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--add-bos", action="store_true", help="prepend BOS to every context")
    parser.add_argument("--write-tasks", metavar="DIR", help="keep the task files in DIR")
    parser.add_argument("--no-verify", action="store_true", help="skip the manifest check")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(func=cmd_eval)
    return parser


def _import_lm_eval():
    try:
        import lm_eval  # lazy: optional dependency (the `eval` extra)
        from lm_eval.models.huggingface import HFLM  # lazy: optional dependency
        from lm_eval.tasks import TaskManager  # lazy: optional dependency
    except ImportError as err:
        raise EvalError(
            f"cascade eval needs lm-evaluation-harness ({err}); install it with "
            f"pip install 'cascade-runner[eval]' ({LM_EVAL_REQUIREMENT})"
        ) from None
    return lm_eval, HFLM, TaskManager


def job_config(checkpoint: Path, job: str | None) -> JobConfig | None:
    """The job that made the checkpoint: --job, else CHECKPOINT/../job.yaml, else None."""
    path = Path(job) if job else checkpoint.parent / "job.yaml"
    if job and not path.is_file():
        raise EvalError(f"--job {path}: file not found; check the path")
    return load_config(path) if path.is_file() else None


def _yaml_task_name(path: Path) -> str:
    """The `task:` of an lm-eval task file (its !function tags are not followed here)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise EvalError(f"{path}: not a readable lm-eval task file ({err})") from None
    name = config.get("task") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise EvalError(f"{path}: no `task:` name; an lm-eval task file names its task")
    return name


def resolve_tasks(
    tokens: list[str], cfg: JobConfig | None, limit: int | None
) -> tuple[list[ChoiceTaskSpec], list[Path]]:
    """(choice task specs to write as task files, lm-eval YAML files given as they are)."""
    job_specs = {spec.task_name(): spec for spec in (job_choice_tasks(cfg) if cfg else [])}
    specs, files = [], []
    for token in tokens:
        if token.endswith((".yaml", ".yml")):
            if not Path(token).is_file():
                raise EvalError(f"--tasks {token}: task file not found; check the path")
            files.append(Path(token))
        elif token.endswith(".jsonl"):
            specs.append(ChoiceTaskSpec(path=token))
        elif token in job_specs or token in BUILTIN_TASKS:
            specs.append(job_specs.get(token) or ChoiceTaskSpec(kind=token))
        else:
            known = sorted(set(BUILTIN_TASKS) | set(job_specs))
            raise EvalError(
                f"--tasks: unknown task {token!r}; give one of {', '.join(known)}, an lm-eval "
                "task file (.yaml) or a JSONL file of items (.jsonl)"
            )
    if limit is not None:
        specs = [spec.model_copy(update={"limit": limit}) for spec in specs]
    if any(spec.kind == "cloze" for spec in specs) and (cfg is None or not job_text_sources(cfg)):
        raise EvalError(
            "--tasks cloze: its items come from the job's held-out test documents; pass --job "
            "with the job file that made the checkpoint (a causal_lm job with data.sources)"
        )
    return specs, files


def task_examples(specs: list[ChoiceTaskSpec], cfg: JobConfig | None, tokenizer) -> dict:
    """{name: (spec, items)} exactly as the job built them (its seed, data and test documents)."""
    documents = None
    if any(spec.kind == "cloze" for spec in specs):
        documents = text_splits(cfg, cfg.models[0], tokenizer).test_documents
    return choice_examples(
        specs,
        test_documents=documents,
        data_cfg=bearing_data(cfg) if cfg else None,
        seed=cfg.seed if cfg else 0,
        where="--tasks",
    )


def run_lm_eval(model, tokenizer, names: list[str], folders: list[Path], args) -> dict:
    """lm_eval.simple_evaluate on the model instance; {task: {"n", metric: value}}."""
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    if not getattr(args, "debug", False):
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    wrapper = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        add_bos_token=bool(args.add_bos),
    )
    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
    try:
        results = lm_eval.simple_evaluate(
            model=wrapper, tasks=names, task_manager=manager, log_samples=False, bootstrap_iters=0
        )
    except (KeyError, ValueError, FileNotFoundError) as err:
        raise EvalError(f"lm-eval could not run {', '.join(names)}: {err}") from None
    table = {}
    for name, values in results["results"].items():
        metrics = {
            key.split(",")[0]: value
            for key, value in values.items()
            if "," in key and "_stderr" not in key and isinstance(value, int | float)
        }
        count = results.get("n-samples", {}).get(name, {}).get("effective")
        table[name.removeprefix(TASK_PREFIX)] = {"n": count, **metrics}
    return table


def evaluate(args) -> dict:
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise EvalError(f"{checkpoint}: not a checkpoint directory; check the path")
    cfg = job_config(checkpoint, args.job)
    tokens = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not tokens:
        tokens = [spec.task_name() for spec in (job_choice_tasks(cfg) if cfg else [])]
    if not tokens:
        raise EvalError("--tasks: no tasks given and no job with choice tasks; name some")
    for option, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise EvalError(f"{option} {value}: must be at least 1")
    specs, files = resolve_tasks(tokens, cfg, args.limit)
    _import_lm_eval()  # before the model loads: a missing extra is the first thing said
    tokenizer = load_tokenizer(checkpoint)
    examples = task_examples(specs, cfg, tokenizer)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pruned(checkpoint, device=device, verify=not args.no_verify)
    with tempfile.TemporaryDirectory(prefix="cascade-eval-") as scratch:
        folder = Path(args.write_tasks) if args.write_tasks else Path(scratch)
        names = [write_task(name, items, folder) for name, (_, items) in examples.items()]
        names += [_yaml_task_name(path) for path in files]
        folders = [folder, *sorted({path.resolve().parent for path in files})]
        return run_lm_eval(model, tokenizer, names, folders, args)


def cmd_eval(args) -> int:
    try:
        table = evaluate(args)
    except (EvalError, CheckpointError, TextDataError, ConfigError, OSError) as exc:
        print(f"error: {'; '.join(str(exc).strip().splitlines())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(table, indent=1))
        return EXIT_OK
    metrics = sorted({key for row in table.values() for key in row if key != "n"})
    print("\t".join(["task", "n", *metrics]))
    for name, row in table.items():
        values = [f"{row[m]:.4f}" if m in row else "-" for m in metrics]
        print("\t".join([name, str(row["n"]), *values]))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (python -m runner.cli.eval ...), same as `cascade eval`."""
    parser = argparse.ArgumentParser(prog="cascade")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
