"""`cascade compare`: every method at every ratio on the same model, data, calibration and step budget."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from runner.config import (
    ConfigError,
    ModelConfig,
    RecoverStageConfig,
    SafeName,
    Strict,
    duplicate_output_names,
    model_entries,
    same_job,
)
from runner.config_files import read_yaml_mapping
from runner.dense_cache import reuse_dense_measures
from runner.errors import user_errors
from runner.job import run_job
from runner.methods import compose, load_method
from runner.output_dir import make_output_dir
from runner.report.model import CompareResult, CompareRow, Report
from runner.report.pages import write_compare_report
from stages.atomic import write_json_atomic

DEFAULT_RECOVERY_STEPS = 300


class CompareConfig(Strict):
    name: SafeName = "compare"
    methods: list[str] = Field(min_length=1)
    ratios: list[float] = Field(min_length=1)
    recovery_steps: int | None = Field(
        None, ge=0, description="total recovery steps given to every method (default 300)"
    )
    recovery_tokens: int | None = Field(
        None,
        ge=1,
        description="total recovery tokens given to every method instead of steps: each recover "
        "stage's steps = its share / (batch_size x block length)",
    )
    recovery_schedule: Literal["steps", "equal", "final_heavy", "proportional"] = Field(
        "steps", description="how recovery_tokens are split over a method's recover stages"
    )
    recovery: dict[str, Any] = Field(
        default_factory=dict,
        description="settings of every recover stage its method preset leaves unset "
        "(batch_size, lr, lora_rank ...): the same batch for every method",
    )
    job: dict[str, Any] = Field(
        description="base job: models, data, calibration, sia, cluster ... (no stages)"
    )


def load_compare_config(
    path: str | Path, overrides: list[str] | None = None, updates: dict | None = None
) -> CompareConfig:
    """Read and validate a compare file; `updates` (top-level keys, e.g. from --methods and
    --ratios) replace the file's values before validation, so they are checked the same way."""
    path = Path(path)
    raw = read_yaml_mapping(path, overrides)
    raw.update(updates or {})
    try:
        cfg = CompareConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [
            (".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, "))
            for e in exc.errors()
        ]
        raise ConfigError(problems, str(path)) from None
    problems = [
        (f"ratios.{i}", "must be a finite number > 1")
        for i, r in enumerate(cfg.ratios)
        if not (math.isfinite(r) and r > 1)
    ]
    if "stages" in cfg.job:
        problems.append(("job.stages", "stages come from the method presets; remove them here"))
    for i, m in enumerate(cfg.methods):
        try:
            load_method(m)
        except ConfigError as exc:
            problems.append((f"methods.{i}", exc.problems[0][1]))
    problems += _budget_problems(cfg)
    problems += _model_problems(cfg.job.get("models") or [])
    problems += _recovery_problems(cfg.recovery)
    if problems:
        raise ConfigError(problems, str(path))
    return cfg


def _budget_problems(cfg: CompareConfig) -> list[tuple[str, str]]:
    if cfg.recovery_tokens is not None and cfg.recovery_steps is not None:
        return [("recovery_tokens", "give recovery_tokens or recovery_steps, not both")]
    if cfg.recovery_tokens is None and cfg.recovery_schedule != "steps":
        return [("recovery_schedule", "splits recovery_tokens; set recovery_tokens too")]
    return []


def recovery_budget(cfg: CompareConfig) -> dict:
    """compose()'s budget arguments: the same tokens (or steps) for every method."""
    if cfg.recovery_tokens is not None:
        return {"recovery_tokens": cfg.recovery_tokens, "recovery_schedule": cfg.recovery_schedule}
    steps = cfg.recovery_steps if cfg.recovery_steps is not None else DEFAULT_RECOVERY_STEPS
    return {"recovery_steps": steps}


def _recovery_problems(recovery: dict) -> list[tuple[str, str]]:
    """Keys of `recovery` that a recover stage does not have, or values it refuses."""
    if "kind" in recovery or "steps" in recovery:
        return [
            (
                "recovery",
                "kind and steps are set by the compare (recovery_steps / recovery_tokens); "
                "remove them",
            )
        ]
    try:
        RecoverStageConfig.model_validate({"kind": "recover", **recovery})
    except ValidationError as exc:
        return [(".".join(map(str, ("recovery", *e["loc"]))), e["msg"]) for e in exc.errors()]
    return []


def _model_problems(entries) -> list[tuple[str, str]]:
    """Bad model entries and two models sharing one run directory, with their job.models paths."""
    problems = []
    entries = model_entries(entries)
    if not isinstance(entries, list):
        return [("job.models", "expected a ref or a list of refs / {ref: ...} mappings")]
    for i, entry in enumerate(entries):
        try:
            ModelConfig.model_validate(entry)
        except ValidationError as exc:
            problems += [
                (".".join(map(str, ("job.models", i, *e["loc"]))), e["msg"]) for e in exc.errors()
            ]
    return problems + duplicate_output_names(entries, "job.models")


def run_compare(cfg: CompareConfig, out: str | Path, *, log=print) -> dict:
    """Runs (or reuses finished) jobs under out/<model>/<method>/<ratio>x and writes
    compare.json, compare.md (+ compare.png) and compare.html; returns compare.json's content."""
    out = Path(out)
    fresh = not out.exists()
    make_output_dir(out)
    rows = []
    models = model_entries(cfg.job.get("models")) or []
    try:
        with reuse_dense_measures():  # one dense measurement per model, not per method x ratio
            for model in models:
                for method in cfg.methods:
                    preset = load_method(method)
                    for ratio in cfg.ratios:
                        rows.append(_run_one(cfg, out, model, preset, ratio, log))
    except user_errors():
        if fresh and not any(p.is_file() for p in out.rglob("*")):
            shutil.rmtree(out, ignore_errors=True)  # rejected before any run wrote a file
        raise
    result = CompareResult(
        name=cfg.name,
        methods=cfg.methods,
        ratios=cfg.ratios,
        **{k: v for k, v in recovery_budget(cfg).items() if k != "recovery_schedule"},
        rows=rows,
    )
    write_json_atomic(out / "compare.json", result.to_json())
    write_compare_report(out, result)
    return result.to_json()


def _run_one(cfg: CompareConfig, out: Path, model, preset, ratio: float, log) -> CompareRow:
    """One method at one ratio; `model` is the job's entry as a mapping ({ref, settings...}).

    A finished run is reused only when it ran exactly the job composed now (same settings).
    """
    model_cfg = ModelConfig.model_validate(model)
    name = model_cfg.output_name
    run_dir = out / name / preset.name / f"{ratio:g}x"
    row = CompareRow(
        model=name, ref=model_cfg.ref, method=preset.name, ratio=ratio, dir=str(run_dir)
    )
    label = f"[compare] {name} {preset.name} {ratio:g}x"
    base = dict(cfg.job, models=[model], name=cfg.name)
    job = compose(base, preset, ratio=ratio, recovery=cfg.recovery, **recovery_budget(cfg))
    report_path, job_path = run_dir / "report.json", run_dir / "job.yaml"
    if report_path.is_file() and job_path.is_file():
        if not same_job(job_path.read_text(), job):
            log(f"{label}: settings changed, running again")
        else:
            try:
                finished = Report.read(report_path)
            except ValidationError:  # written by another version: measure it again
                log(f"{label}: report.json is not a report of this version, running again")
            else:
                log(f"{label}: finished earlier, reusing")
                return row.with_report(finished)
    log(f"{label} ...")
    t0 = time.perf_counter()
    try:
        report = run_job(job, run_dir, force=True, log=lambda m: log(f"  {m}"))[name]
    except Exception as exc:  # noqa: BLE001 - one failing method must not stop the comparison
        log(f"{label} FAILED: {exc}")
        error = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
        return CompareRow.model_validate(row.to_json() | error)
    row = row.with_report(Report.model_validate(report))
    log(f"{label}: {row.achieved_ratio:.2f}x, accuracy {row.accuracy:.4f}")
    return row
