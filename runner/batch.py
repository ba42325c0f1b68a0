"""`cascade batch`: one compression job per model of a family, run concurrently on Ray when it is there.

Each model gets its own ordinary job directory OUT/<model>/. A model whose report.json exists (for
the same resolved config) is skipped, so a killed batch simply continues when re-run; one failing
model is recorded in the summary and the others go on. Inside a batch every job runs in-process on
the resources reserved for it (its Ray task), so nested actors can never starve each other.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from runner.config import (
    ClusterConfig,
    ConfigError,
    JobConfig,
    ModelConfig,
    RecoverStageConfig,
    SafeName,
    Strict,
    TargetConfig,
    dump_config,
    duplicate_output_names,
    model_entries,
    parse_config,
    same_job,
)
from runner.config_files import read_yaml_mapping
from runner.devices import DeviceError, load_device
from runner.errors import JobError
from runner.job import run_job
from runner.methods import compose, load_method
from runner.output_dir import make_output_dir
from runner.progress import step_bar
from runner.report.model import FamilyRow, Report
from runner.report.pages import write_family_report
from stages.atomic import write_json_atomic

FAMILY_JSON = "family.json"
JOB_SECTIONS = ("seed", "data", "calibration", "sia", "cluster", "guards", "output")
_FORWARDED_ENV = ("CASCADE_CACHE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HOME")


class BatchError(JobError, ValueError):
    """The batch as a whole cannot run (e.g. the output directory belongs to another family)."""


class FamilyConfig(Strict):
    name: SafeName
    description: str = ""
    models: list[ModelConfig] = Field(min_length=1)
    method: str | None = Field(None, description="a preset of configs/methods (or a YAML path)")
    stages: list[dict[str, Any]] | None = Field(None, description="inline stages instead of method")
    recovery_steps: int | None = Field(None, ge=0, description="total recovery steps per model")
    target: TargetConfig
    job: dict[str, Any] = Field(
        default_factory=dict, description=f"sections: {', '.join(JOB_SECTIONS)}"
    )
    concurrency: int | None = Field(None, ge=1, description="max jobs at once (default: resources)")

    @field_validator("models", mode="before")
    @classmethod
    def _models_shorthand(cls, value: Any) -> Any:
        return model_entries(value)

    @field_validator("job")
    @classmethod
    def _sections(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(JOB_SECTIONS))
        if unknown:
            raise ValueError(
                f"job sections {unknown} not allowed here; use {', '.join(JOB_SECTIONS)}"
            )
        return value

    @model_validator(mode="after")
    def _one_method(self) -> FamilyConfig:
        if (self.method is None) == (self.stages is None):
            raise ValueError("give exactly one of method (a preset name) or stages (inline)")
        if self.target.ratio is None and self.target.device is None:
            if self.target.budget_bytes is None:
                raise ValueError("target needs ratio, or device (+ fraction), or budget_bytes")
        return self


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    unknown = "unknown key (not a family option)"
    return [
        (
            ".".join(str(p) for p in e["loc"]),
            unknown if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, "),
        )
        for e in exc.errors()
    ]


def load_family(path: str | Path, overrides: list[str] | None = None) -> FamilyConfig:
    """Read and validate a family file; one ConfigError lists every problem found."""
    path = Path(path)
    raw = read_yaml_mapping(path, overrides)
    return parse_family(raw, str(path))


def parse_family(raw: dict, source: str = "family") -> FamilyConfig:
    try:
        family = FamilyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_problems(exc), source) from None
    problems: list[tuple[str, str]] = []
    method_ok = True
    if family.method is not None:
        try:
            load_method(family.method)
        except ConfigError as exc:
            problems.append(("method", exc.problems[0][1]))
            method_ok = False
    if family.target.device is not None:
        try:
            load_device(family.target.device)
        except DeviceError as exc:
            problems.append(("target.device", str(exc)))
    problems += duplicate_output_names(family.models)
    if method_ok:  # the composed job checks stages and sections exactly as `cascade run` does
        try:
            job_config(family, family.models[0])
        except ConfigError as exc:
            problems += [(_job_path(p), m) for p, m in exc.problems]
    if problems:
        raise ConfigError(problems, source)
    return family


def _job_path(path: str) -> str:
    head = path.split(".", 1)[0]
    return path if head in ("stages", "models", "target") else f"job.{path}" if path else "job"


def job_config(family: FamilyConfig, model: ModelConfig) -> JobConfig:
    """The job one model runs: family sections + method stages + target, executed in-process."""
    base = copy.deepcopy(family.job) | {
        "name": f"{family.name}-{model.output_name}",
        "models": [model.model_dump(exclude_unset=True)],
        "target": family.target.model_dump(exclude_unset=True),
    }
    if family.method is not None:
        cfg = compose(base, load_method(family.method), recovery_steps=family.recovery_steps)
    else:
        cfg = parse_config(base | {"stages": family.stages}, f"family {family.name}")
    cfg.cluster.executor = "local"  # the batch task holds the job's resources; no nested actors
    for stage in cfg.stages:
        if isinstance(stage, RecoverStageConfig):
            stage.runner = "local"
    return cfg


def job_resources(family: FamilyConfig) -> tuple[float, float]:
    """(cpus, gpus) one job reserves: its workers' share when the job asked for Ray, else 1 CPU."""
    cluster = ClusterConfig.model_validate(family.job.get("cluster", {}))
    workers = cluster.workers if cluster.executor == "ray" else 1
    return workers * cluster.cpus_per_worker, workers * cluster.gpus_per_worker


# ----------------------------------------------------------------------------- running one job
def run_one(
    cfg_yaml: str, out: str, log_path: str, resume: bool, force: bool, threads: int
) -> dict:
    """Run one model's job (in a Ray task or in-process); never raises, returns status + report.

    The intra-op thread count is the job's while it runs and the caller's again afterwards (an
    in-process batch must not change how the rest of the process rounds its matmuls)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return _run_one(cfg_yaml, Path(out), log_path, resume, force)
    finally:
        torch.set_num_threads(previous)


def _run_one(cfg_yaml: str, out_dir: Path, log_path: str, resume: bool, force: bool) -> dict:
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log_file:

        def log(message: str) -> None:
            log_file.write(message + "\n")
            log_file.flush()

        try:
            cfg = parse_config(yaml.safe_load(cfg_yaml), str(out_dir / "job.yaml"))
            reports = run_job(cfg, out_dir, resume=resume, force=force, log=log)
            report = next(iter(reports.values()))
            return {"status": "done", "report": report, "seconds": time.perf_counter() - t0}
        except Exception as exc:  # noqa: BLE001 - one failing model must not stop the family
            log(traceback.format_exc())
            first = (str(exc).strip().splitlines() or [""])[0]
            return {
                "status": "failed",
                "error": f"{type(exc).__name__}: {first}",
                "seconds": time.perf_counter() - t0,
            }


@dataclass
class Entry:
    name: str
    ref: str
    out: Path
    log: Path
    cfg_yaml: str
    resume: bool = False
    force: bool = False
    result: dict = field(default_factory=dict)

    def args(self, threads: int) -> tuple:
        return self.cfg_yaml, str(self.out), str(self.log), self.resume, self.force, threads


def _plan(family: FamilyConfig, out: Path, resume: bool, log) -> list[Entry]:
    entries = []
    for model in family.models:
        name = model.output_name
        cfg = job_config(family, model)
        cfg_yaml = dump_config(cfg)
        entry = Entry(name, model.ref, out / name, out / "logs" / f"{name}.log", cfg_yaml)
        job_yaml, report = entry.out / "job.yaml", entry.out / "report.json"
        if report.is_file():
            if same_job(job_yaml.read_text() if job_yaml.is_file() else None, cfg):
                log(f"[batch] {name}: finished earlier, skipping")
                entry.result = {"status": "skipped", "report": json.loads(report.read_text())}
            else:
                entry.result = {
                    "status": "failed",
                    "error": f"BatchError: {entry.out} holds a finished job with a different "
                    "config; delete it or use another --output",
                }
        else:
            entry.resume = resume and job_yaml.is_file()
            entry.force = not entry.resume and entry.out.exists() and any(entry.out.iterdir())
        entries.append(entry)
    return entries


def _log_result(entry: Entry, log) -> None:
    r = entry.result
    if r["status"] == "failed":
        log(f"[batch] {entry.name}: FAILED: {r['error']} (see {entry.log})")
    elif r["status"] == "done":
        report = Report.model_validate(r["report"])
        f = report.final
        log(
            f"[batch] {entry.name}: done in {r['seconds']:.0f}s: {f.compression_ratio:.2f}x, "
            f"accuracy {f.accuracy:.4f} (dense {f.dense_accuracy:.4f})"
        )
        for warning in report.warnings:
            log(f"[batch] {entry.name}: WARNING: {warning}")


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def run_batch(
    family: FamilyConfig,
    out: str | Path,
    *,
    resume: bool = False,
    executor: str = "auto",
    log=print,
) -> dict:
    """Run (or skip finished) jobs for every model; write family.{json,md,html} + plots."""
    if executor not in ("auto", "ray", "local"):
        raise BatchError(f"run_batch: executor must be auto, ray or local, got {executor!r}")
    out = Path(out)
    _claim_output(out, family.name)
    started = time.perf_counter()
    entries = _plan(family, out, resume, log)
    todo = [e for e in entries if not e.result]
    for entry in entries:
        if entry.result:
            _log_result(entry, log)
    use_ray = executor == "ray" or (executor == "auto" and ray_available())
    if executor == "ray" and not ray_available():
        raise BatchError("run_batch: executor='ray' but ray is not installed")
    cpus, gpus = job_resources(family)
    mode = "ray" if use_ray else "sequential"
    enabled = bool(family.job.get("output", {}).get("progress", True))
    with step_bar(len(todo), f"{family.name} jobs", enabled, "job") as tick:
        _dispatch(family, todo, use_ray, executor, cpus, gpus, log, tick)
    summary = build_summary(family, entries, mode, cpus, gpus, time.perf_counter() - started)
    write_json_atomic(out / FAMILY_JSON, summary)
    write_family_report(out)
    return summary


def _dispatch(family, todo, use_ray, executor, cpus, gpus, log, tick) -> None:
    def on_result(entry: Entry, log) -> None:
        _log_result(entry, log)
        if tick is not None:
            tick(0)

    if todo and use_ray:
        address = family.job.get("cluster", {}).get("address")
        from cluster.batch import dispatch_on_ray  # lazy: ray is optional (imported there)

        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        dispatch_on_ray(
            todo,
            run_one,
            on_result,
            cpus=cpus,
            gpus=gpus,
            limit=family.concurrency or len(todo),
            address=address,
            env=env,
            log=log,
        )
    else:
        if todo and executor == "auto":
            log("[batch] ray is not installed: running the models one after another")
        for entry in todo:
            log(f"[batch] {entry.name}: running in-process ...")
            entry.result = run_one(*entry.args(os.cpu_count() or 1))
            on_result(entry, log)


def _claim_output(out: Path, name: str) -> None:
    marker = out / FAMILY_JSON
    if marker.is_file():
        previous = json.loads(marker.read_text()).get("name")
        if previous != name:
            raise BatchError(f"{out} holds the batch of family {previous!r}, not {name!r}")
    else:  # claim the directory now: a killed batch must still be recognised when re-run
        make_output_dir(out)
        write_json_atomic(marker, {"name": name, "running": True, "models": []})


# ----------------------------------------------------------------------------- summary
def build_summary(family: FamilyConfig, entries: list[Entry], mode, cpus, gpus, seconds) -> dict:
    """family.json's content; its rows are typed (`FamilyRow`) and written as they were set."""
    rows = [FamilyRow.from_result(e.name, e.ref, e.out, e.result).to_json() for e in entries]
    return {
        "name": family.name,
        "description": family.description,
        "method": family.method or "inline stages",
        "target": family.target.model_dump(exclude_unset=True),
        "recovery_steps": family.recovery_steps,
        "execution": {"mode": mode, "cpus_per_job": cpus, "gpus_per_job": gpus},
        "concurrency": family.concurrency,
        "seconds": round(seconds, 2),
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")},
        "models": rows,
    }
