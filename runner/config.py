"""Typed job configuration: YAML -> pydantic, every problem reported at once with its YAML path.

The sections live in runner/config_sections.py; here they become one JobConfig, with the task's
own options (job_schema), the checks that span sections, and reading / writing job.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from runner.config_files import ConfigError, read_yaml_mapping
from runner.config_sections import (
    COMPENSATE_DEFAULTS,
    RECOVERY_DEFAULTS,
    RECOVERY_DEFAULTS_OTHERS,
    CalibrationConfig,
    ClusterConfig,
    DataSection,
    EvaluationConfig,
    GuardConfig,
    ModelConfig,
    OutputConfig,
    RecoverStageConfig,
    RecoveryConfig,
    SafeName,
    SIAConfig,
    StageConfig,
    Strict,
    TargetConfig,
    duplicate_output_names,
    model_entries,
)
from runner.data.bearing import MAX_SEED
from runner.tasks import get_task, task_names
from stages.base import stage_names
from stages.prune_stage import is_prune_stage, streaming_problems


class JobConfig(Strict):
    name: SafeName = Field(
        "job",
        description="letters, digits, '.', '_', '-' (the default output directory is runs/<name>)",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    task: str = Field(
        "classification",
        description="what the model is for: the name of a task in runner/tasks; its options "
        "(Task.options) join the sections they extend",
    )
    models: list[ModelConfig] = Field(min_length=1)
    data: DataSection = Field(default_factory=DataSection)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    stages: list[StageConfig] = Field(min_length=1)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    sia: SIAConfig = Field(default_factory=SIAConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    guards: GuardConfig = Field(default_factory=GuardConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _recovery_defaults_of_the_task(self) -> JobConfig:
        """Recover-stage settings left unset get their task's (the dumped job.yaml shows them)."""
        defaults = dict(RECOVERY_DEFAULTS.get(self.task, RECOVERY_DEFAULTS_OTHERS))
        if self.calibration.streamed:
            defaults["loss"] = "ce"
        for stage in self.stages:
            if not isinstance(stage, RecoverStageConfig):
                continue
            for key, value in defaults.items():
                if getattr(stage, key) is None:
                    setattr(stage, key, value)
        return self

    @model_validator(mode="after")
    def _compensation_default_of_the_task(self) -> JobConfig:
        """Heads / channels stages that do not say `compensate` get their task's."""
        method = COMPENSATE_DEFAULTS.get(self.task, "none")
        for stage in self.stages:
            if is_prune_stage(stage) and stage.kind != "layers":
                if "compensate" not in stage.model_fields_set:
                    stage.compensate = method
        return self

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in task_names():
            raise ValueError(f"unknown task {value!r}; choose from {', '.join(task_names())}")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _models_shorthand(cls, value: Any) -> Any:
        return model_entries(value)

    @model_validator(mode="after")
    def _cross_section(self) -> JobConfig:
        problems: list[str] = []
        names = stage_names(self.stages)
        if len(set(names)) != len(names):
            problems.append(f"stage names must be unique, got {names}")
        if (
            any(getattr(s, "share", None) is not None for s in self.stages)
            and self.target.ratio is None
        ):
            if self.target.device is None and self.target.budget_bytes is None:
                problems.append("stages use share but target has no ratio, device or budget_bytes")
        if not any(is_prune_stage(s) for s in self.stages):
            problems.append("stages: at least one layers/heads/channels stage is required")
        if self.target.keep_attention:
            problems += [
                f"stages.{i} ({names[i]}): target.keep_attention keeps every layer's heads; "
                "remove this heads stage or set keep_attention: false"
                for i, s in enumerate(self.stages)
                if s.kind == "heads"
            ]
        problems += _recovery_problems(self)
        problems += get_task(self.task).config_problems(self, names)
        if self.calibration.streamed:
            problems += _streamed_problems(self, names)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _task_schema(cls, value: Any, handler) -> JobConfig:
        """A job is validated by its task's schema (job_schema); defined last, so it runs first.
        Another task's keys are taken out first (see _foreign_keys) and, unless they sit at that
        task's default, refused beside every other problem."""
        if cls is not JobConfig or not isinstance(value, dict):
            return handler(value)
        task = value.get("task", "classification")
        task = task if isinstance(task, str) and task in task_names() else None
        value, foreign = _foreign_keys(value, task)
        schema = job_schema(task) if task is not None else cls
        errors: list = []
        try:
            cfg = handler(value) if schema is cls else schema.model_validate(value)
        except ValidationError as exc:
            if not foreign:
                raise
            errors = [
                {"type": PydanticCustomError(e["type"], e["msg"]), "loc": e["loc"], "input": None}
                for e in exc.errors(include_url=False)
            ]
        if foreign:
            raise ValidationError.from_exception_data(cls.__name__, errors + foreign)
        return cfg


# ----------------------------------------------------------------------------- task options
_SCHEMAS: dict[tuple[str, type], type[JobConfig]] = {}


def job_schema(task: str) -> type[JobConfig]:
    """JobConfig for jobs of `task`: each section its options (Task.options) extend gets their keys
    beside its own, so `cfg.evaluation.test_blocks` reads as it always did, error paths stay the
    YAML's, and a job of another task has no such key. Built once per task."""
    options = get_task(task).options
    if options is None:
        return JobConfig
    key = (task, options)
    if key not in _SCHEMAS:
        fields = {}
        for section, info in options.model_fields.items():
            shared = JobConfig.model_fields[section].annotation
            merged = type(  # the shared keys first, then the task's (their order in job.yaml)
                shared.__name__,
                (info.annotation, shared),
                {
                    "__doc__": shared.__doc__,
                    "__module__": shared.__module__,
                    "model_config": shared.model_config,
                },
            )
            fields[section] = (merged, Field(default_factory=merged))
        _SCHEMAS[key] = create_model(f"JobConfig_{task}", __base__=JobConfig, **fields)
    return _SCHEMAS[key]


def _task_keys() -> dict[tuple[str, str], tuple[str, Any]]:
    """(section, key) -> (owning task, its default as JSON) for every registered task's options."""
    owned: dict[tuple[str, str], tuple[str, Any]] = {}
    for name in task_names():
        options = get_task(name).options
        if options is None:
            continue
        for section, values in options().model_dump(mode="json").items():
            for key, default in values.items():
                owned.setdefault((section, key), (name, default))
    return owned


def _foreign_keys(raw: dict, task: str | None) -> tuple[dict, list]:
    """`raw` without the keys other tasks own, and the errors of those not at their defaults.

    Every job.yaml written before tasks owned their options carries the others' defaults (a
    classification job's `data.sources: []`, `evaluation.prompts`): it must still read as the job
    it was, so those go silently. Any other value names its task (an error beside the rest)."""
    mine = get_task(task).options if task is not None else None
    mine_keys = set()
    if mine is not None:
        for section, info in mine.model_fields.items():
            mine_keys |= {(section, key) for key in info.annotation.model_fields}
    raw, errors = dict(raw), []
    for (section, key), (owner, default) in _task_keys().items():
        values = raw.get(section)
        if (section, key) in mine_keys or not isinstance(values, dict) or key not in values:
            continue
        raw[section] = {k: v for k, v in values.items() if k != key}
        if values[key] != default:
            message = (
                f"an option of task {owner}, not of this job's task {task or raw.get('task')}; "
                f"set task: {owner} or remove it"
            )
            error = PydanticCustomError("foreign_option", message)
            errors.append({"type": error, "loc": (section, key), "input": values[key]})
    return raw, errors


def _recovery_problems(cfg: JobConfig) -> list[str]:
    """What the job-level recovery section asks that the rest of the job cannot give."""
    recovery, problems = cfg.recovery, []
    recovers = [s for s in cfg.stages if isinstance(s, RecoverStageConfig)]
    if recovery.tokens is not None and not recovers:
        problems.append("recovery.tokens: the job has no recover stage to spend them")
    if recovery.tokens is None and recovery.schedule != "steps":
        problems.append(
            f"recovery.schedule: {recovery.schedule} splits recovery.tokens; set recovery.tokens "
            "or use schedule: steps"
        )
    target = cfg.target
    if recovery.schedule == "proportional" and (
        target.ratio is None and target.device is None and target.budget_bytes is None
    ):
        problems.append(
            "recovery.schedule: proportional needs the parameters the job will remove; set "
            "target.ratio (or target.device / budget_bytes)"
        )
    if recovery.data == "self" and cfg.task != "causal_lm":
        problems.append(f"recovery.data: self generates text; task {cfg.task} reads no text")
    problems += [
        f"recovery.prompt_tokens: {recovery.prompt_tokens} leaves no tokens to generate in "
        f"models.{i}'s {m.max_length}-token blocks"
        for i, m in enumerate(cfg.models)
        if recovery.data == "self" and recovery.prompt_tokens >= m.max_length
    ]
    if recovery.data == "self" and cfg.calibration.streamed:
        problems.append(
            "recovery.data: self needs the whole dense model, which streamed never loads"
        )
    return problems


def _streamed_problems(cfg: JobConfig, names: list[str]) -> list[str]:
    """What the layer-streamed path cannot do (it never holds the whole model)."""
    problems = [text for _, text in streaming_problems(cfg.stages, names)]
    problems += [
        f"stages.{i}.loss: kd needs a teacher cached from the model before the cut, which "
        "calibration.streamed never holds; use loss: ce"
        for i, s in enumerate(cfg.stages)
        if s.kind == "recover" and s.loss == "kd"
    ]
    if cfg.guards.max_accuracy_drop is not None:
        problems.append("guards.max_accuracy_drop: streamed stages are not evaluated one by one")
    return problems


def _error_path(loc: tuple) -> str:
    # Drop pydantic's union tags (e.g. stages.0.recover.lr -> stages.0.lr).
    parts = [str(p) for p in loc if p not in ("layers", "heads", "channels", "recover")]
    return ".".join(parts)


def parse_config(raw: Any, source: str = "config") -> JobConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            [("", f"expected a mapping at the top level, got {type(raw).__name__}")], source
        )
    problems, cfg = [], None
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (not a config option)"
            problems.append((_error_path(err["loc"]), msg))
    problems += duplicate_output_names(raw.get("models"))
    if problems:
        raise ConfigError(problems, source)
    return cfg


# settings that change how a job reports progress, not what it computes or writes
_RESULT_NEUTRAL = {"output": ("progress",)}


def same_job(previous_yaml: str | None, cfg: JobConfig) -> bool:
    """Did the job recorded in a job.yaml compute what `cfg` would?

    The old file is read through today's schema first, so a setting added since (at its default)
    does not make every finished run look different; a file today's schema rejects is different.
    """
    if previous_yaml is None:
        return False
    try:
        previous = JobConfig.model_validate(yaml.safe_load(previous_yaml))
    except (ValidationError, yaml.YAMLError):
        return False
    return result_settings(previous) == result_settings(cfg)


def result_settings(cfg: JobConfig) -> dict:
    """The config as JSON without the settings that change nothing a job computes or writes."""
    dumped = cfg.model_dump(mode="json")
    for section, keys in _RESULT_NEUTRAL.items():
        for key in keys:
            dumped[section].pop(key, None)
    return dumped


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    return parse_config(read_yaml_mapping(path, overrides), str(path))


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
