"""A job: one config, one or more models, one output directory (refusing to clobber others' results)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

from cluster.executor import cluster_session
from cluster.orphans import reap_orphans, recorded_session
from runner.config import JobConfig, dump_config, same_job
from runner.errors import JobError, user_errors
from runner.output_dir import is_empty_or_missing, output_errors
from runner.paths import shown
from runner.pipeline import run_model
from runner.report.job import write_summary
from runner.report.model import Report
from runner.resume import check_resumable
from runner.run_lock import clear_run_dir, run_entries, run_lock

_JOB_MARKERS = ("job.yaml", "events.jsonl", "summary.json", "report.json")


def prepare_output(cfg: JobConfig, out: Path, *, resume: bool, force: bool) -> None:
    """Refuse to mix two jobs in one directory; --resume continues the same job, --force replaces it."""
    resolved = dump_config(cfg)
    if out.exists() and run_entries(out):
        is_job_dir = any((out / m).exists() for m in _JOB_MARKERS)
        if resume:
            previous = out / "job.yaml"
            if not previous.is_file():
                raise JobError(f"--resume: {out} holds no job.yaml, nothing to resume")
            if not same_job(previous.read_text(errors="replace"), cfg):
                raise JobError(
                    f"--resume: {out}/job.yaml is a different config than this run's; use --force to restart"
                )
            check_resumable(cfg, out)  # each finished stage was made with these settings
            return
        if not force:
            raise JobError(
                f"output directory {out} already holds results; use --resume to continue or --force to replace"
            )
        if not is_job_dir:
            raise JobError(
                f"--force: {out} is not a job output directory (no job.yaml); refusing to delete it"
            )
        clear_run_dir(out)  # keeps the lock this job holds
    elif resume:
        raise JobError(f"--resume: {out} does not exist or is empty, nothing to resume")
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.yaml").write_text(resolved)


def run_job(
    cfg: JobConfig, out: str | Path, *, resume: bool = False, force: bool = False, log=print
) -> dict:
    """Run every model of the job; returns {model_dir_name: report}."""
    out = Path(out)
    _check_embedded_capacity(cfg)
    with output_errors(out):
        fresh = is_empty_or_missing(out)
    with ExitStack() as held:
        with output_errors(out):
            held.enter_context(run_lock(out, log))  # one writer per directory, the whole job
        try:
            reap_orphans(out, log=log)  # what a killed earlier run's embedded Ray left
            with output_errors(out):
                prepare_output(cfg, out, resume=resume, force=force)
            with cluster_session(cfg.cluster), recorded_session(cfg.cluster, out):
                return _run_models(cfg, out, resume=resume, log=log)
        except user_errors():
            if fresh and not any(out.glob("**/events.jsonl")):
                shutil.rmtree(out, ignore_errors=True)  # rejected before it started: no trace
            raise


def _check_embedded_capacity(cfg: JobConfig) -> None:
    """An embedded Ray can only have this machine's CPUs and GPUs: refuse more before starting
    Ray or loading anything (a joined cluster is checked once connected, by the executor)."""
    c = cfg.cluster
    if c.executor != "ray" or c.address or os.environ.get("RAY_ADDRESS"):
        return
    from cluster.ray_session import check_capacity  # lazy: imports Ray, which local jobs skip

    check_capacity(c.workers, c.cpus_per_worker, c.gpus_per_worker, embedded=True)


def _run_models(cfg: JobConfig, out: Path, *, resume: bool, log) -> dict:
    reports, typed = {}, {}
    single = len(cfg.models) == 1
    for model_cfg in cfg.models:
        name = model_cfg.output_name
        model_out = out if single else out / name
        if not single and resume and (model_out / "report.json").is_file():
            log(f"[{name}] already finished, skipping")
            reports[name] = json.loads((model_out / "report.json").read_text())
            typed[name] = Report.model_validate(reports[name])
            continue
        log(f"[{shown(name)}] compressing {shown(model_cfg.ref)}")
        resume_model = resume and (model_out / "stages").exists()
        reports[name] = run_model(cfg, model_cfg, model_out, resume=resume_model, log=log)
        typed[name] = Report.model_validate(reports[name])
        f = typed[name].final
        dense = "not measured" if f.dense_accuracy is None else f"{f.dense_accuracy:.4f}"
        log(
            f"[{name}] done: {f.compression_ratio:.2f}x, accuracy {f.accuracy:.4f} "
            f"(dense {dense}) -> {model_out / 'checkpoint'}"
        )
    if not single:
        write_summary(out, typed)
    return reports
