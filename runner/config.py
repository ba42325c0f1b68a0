"""Typed job configuration: YAML -> pydantic, every problem reported at once with its YAML path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from runner.config_files import ConfigError, read_yaml_mapping
from runner.data.bearing import MAX_SEED, DataConfig
from runner.paths import dir_name_for_ref, shown
from runner.tasks import get_task, task_names
from stages.base import stage_names
from stages.prune_stage import PruneStage, is_prune_stage, streaming_problems
from stages.stage_plan import PlanLimits

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def _safe_name(value: str) -> str:
    """Names become directory names: no path separators, no '.' or '..', nothing hidden."""
    if not _SAFE_NAME.fullmatch(value):
        raise ValueError(
            f"{shown(value)!r} cannot name a directory: use up to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter, digit or '_'"
        )
    return value


SafeName = Annotated[str, AfterValidator(_safe_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    ref: str = Field(
        min_length=1, description="built-in demo name or local HF checkpoint directory"
    )
    name: SafeName | None = Field(
        None,
        description="output directory name (default: the ref's last path part); "
        "needed to run one ref twice with different settings",
    )
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_length: int = Field(96, ge=8, le=8192)
    finetune_steps: int = Field(
        0, ge=0, description="fine-tune the dense model on the task first (pretrained models)"
    )
    finetune_lr: float = Field(1e-4, gt=0.0)

    @property
    def output_name(self) -> str:
        return self.name or dir_name_for_ref(self.ref)


def model_entries(value: Any) -> Any:
    """`models: ref`, `models: [ref, {ref: ..., name: ...}]` -> a list of mappings."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [{"ref": v} if isinstance(v, str) else v for v in value]
    return value


def duplicate_output_names(entries: Any, path: str = "models") -> list[tuple[str, str]]:
    """Two models writing one directory would overwrite each other's results.

    Works on raw entries (entries that do not validate are left to the schema's own errors), so
    it can run beside pydantic's validation and every problem is still listed at once.
    """
    problems, seen = [], {}
    entries = model_entries(entries)
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(entry, ModelConfig):
            name = entry.output_name
        else:
            try:
                name = ModelConfig.model_validate(entry).output_name
            except ValidationError:
                continue
        if name in seen:
            problems.append(
                (
                    f"{path}.{i}",
                    f"same output directory {name!r} as {path}.{seen[name]}; "
                    f"set {path}.{i}.name to a distinct value",
                )
            )
        seen.setdefault(name, i)
    return problems


class CalibrationConfig(Strict):
    batch_size: int = Field(16, ge=1)
    min_samples: int = Field(8, ge=1, description="refuse to estimate importance on fewer rows")
    streamed: bool = Field(
        False,
        description="prune layer-streamed from the safetensors files: the dense model is never "
        "loaded whole (docs/STREAMING.md); prune stages first, layer-local criteria only",
    )


class TargetConfig(Strict):
    """What the pruned model must be: its size, and a layout the engine it is served by accepts.

    layout: per_layer = widths vary per layer (loads with load_pruned; llama.cpp via GGUF 'deci');
    uniform = every remaining layer keeps the same heads / KV groups and FFN width (an ordinary
    config: plain from_pretrained, vLLM, TensorRT-LLM, llama.cpp). round_to: FFN widths are
    multiples of it (e.g. 64 / 128 / 256 for TensorRT-LLM). keep_attention: no layer loses heads
    (prune layers and FFN channels only): vLLM's Nemotron-NAS / DeciLM path takes per-layer KV
    heads and FFN widths but one global query-head count. See docs/DEPLOY.md.
    """

    ratio: float | None = Field(
        None, gt=1.0, description="overall compression (dense/pruned params)"
    )
    layout: Literal["per_layer", "uniform"] = "per_layer"
    round_to: int | None = Field(None, ge=2, description="FFN widths a multiple of this")
    keep_attention: bool = Field(False, description="prune layers and FFN channels only")
    min_keep_layers: int = Field(1, ge=1)
    min_keep_heads: int = Field(1, ge=1)
    min_keep_channels: int = Field(1, ge=1)
    device: str | None = None
    fraction: float | None = Field(None, gt=0.0, le=1.0)
    budget_bytes: int | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _uniform_layout_alias(cls, value: Any) -> Any:
        """`uniform_layout: true|false` (before target.layout existed) still reads the same."""
        if isinstance(value, dict) and "uniform_layout" in value:
            value = dict(value)
            uniform = value.pop("uniform_layout")
            value.setdefault("layout", "uniform" if uniform else "per_layer")
        return value

    @property
    def uniform(self) -> bool:
        return self.layout == "uniform"

    def plan_limits(self, params_target: int | None) -> PlanLimits:
        """What every stage's plan respects (stages.stage_plan.plan_stage)."""
        return PlanLimits(
            params_target=params_target,
            min_keep={
                "layers": self.min_keep_layers,
                "heads": self.min_keep_heads,
                "channels": self.min_keep_channels,
            },
            uniform=self.uniform,
            round_to=self.round_to,
        )

    @model_validator(mode="after")
    def _budget_needs_device(self) -> TargetConfig:
        if self.fraction is not None and self.device is None:
            raise ValueError("fraction needs target.device")
        return self


# What a recover stage that leaves loss / teacher / kd_temperature unset gets, by task. Causal
# LMs distil the dense model's next-token distribution at T = 1: on SmolLM2 at 1.25x, at equal
# tokens, it recovered held-out validation perplexity far better than CE (docs/RESULTS.md
# "Distillation"); streamed jobs never hold the dense model, so they keep CE.
RECOVERY_DEFAULTS = {"causal_lm": {"loss": "kd", "teacher": "dense", "kd_temperature": 1.0}}
RECOVERY_DEFAULTS_OTHERS = {"loss": "ce", "teacher": "pre_stage", "kd_temperature": 2.0}

# What a heads / channels stage that leaves `compensate` unset gets, by task. Causal LMs refit the
# consuming projection by least squares: on SmolLM2 at 1.25x it took validation perplexity from
# 1.65x dense to 1.31x with no training (docs/RESULTS.md "Compensation"); other tasks were not
# measured and keep none.
COMPENSATE_DEFAULTS = {"causal_lm": "lsq"}


class RecoverStageConfig(Strict):
    """Short recovery after a prune stage: LoRA (merged back), full fine-tune, or mask tuning."""

    kind: Literal["recover"]
    name: str | None = None
    method: Literal["lora", "full", "mask"] = "lora"
    steps: int = Field(100, ge=0)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(16, ge=1)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    loss: Literal["ce", "lm", "kd"] | None = Field(
        None,
        description="ce: the task's own loss (next-token CE for causal_lm, also called lm); "
        "kd: distillation from `teacher`; None: the task's default (RECOVERY_DEFAULTS)",
    )
    teacher: Literal["pre_stage", "dense"] | None = Field(
        None, description="None: the task's default (RECOVERY_DEFAULTS)"
    )
    kd_temperature: float | None = Field(
        None, gt=0.0, description="None: the task's default (RECOVERY_DEFAULTS)"
    )
    kd_alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="kd loss = alpha x KL x T^2 + (1 - alpha) x the task loss"
    )
    kd_top_k: int | None = Field(
        128,
        ge=1,
        description="causal_lm: teacher logits cached per token (+ one bucket for the rest of the "
        "vocabulary); null = the whole vocabulary (4 B x vocabulary per token)",
    )
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="bf16: autocast the forward and loss in bf16; auto: bf16 where this machine "
        "has native bf16 and a measured bf16 matmul beats fp32 (docs/PERFORMANCE.md)",
    )
    loss_chunk: int = Field(
        0,
        ge=0,
        description="causal_lm: > 0 runs the LM head and the loss this many tokens at a time "
        "(no full-vocabulary logits for the whole batch); 0: all at once",
    )
    runner: Literal["local", "ray_train"] = "local"
    strategy: Literal["ddp", "deepspeed_zero2", "deepspeed_zero3"] = "ddp"


StageConfig = Annotated[PruneStage | RecoverStageConfig, Field(discriminator="kind")]


class RecoveryConfig(Strict):
    """The job's recovery as a whole: its budget in tokens, how the recover stages share it, and
    the text they read (docs/RECOVERY.md).

    tokens: training token positions of all recover stages together; a stage's steps are its
    share / (its batch_size x the block length). Shares (`schedule`): steps = in proportion to
    each stage's `steps`; equal; final_heavy = `final_share` to the last stage, the rest equally;
    proportional = in proportion to the parameters removed since the previous recovery (the
    remainder of the budget goes to the last stage). Without tokens, each stage runs its steps.
    data: corpus = blocks of the train split; self = the same blocks' first `prompt_tokens`
    tokens continued by the dense model itself (self-data distillation).
    """

    tokens: int | None = Field(None, ge=1, description="recovery tokens of the whole job")
    schedule: Literal["steps", "equal", "final_heavy", "proportional"] = "steps"
    final_share: float = Field(0.5, gt=0.0, le=1.0, description="final_heavy: last stage's share")
    data: Literal["corpus", "self"] = "corpus"
    prompt_tokens: int = Field(16, ge=1, description="self: tokens of each block kept as prompt")
    sample_temperature: float = Field(
        1.0, ge=0.0, description="self: sampling temperature of the continuations (0 = greedy)"
    )


class SIAConfig(Strict):
    enabled: bool = True
    pairs: int = Field(12, ge=2)
    threshold: float = Field(0.5, gt=0.0)
    removal_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    policy: Literal["warn", "shrink", "stop"] = "warn"
    shrink_steps: int = Field(2, ge=2, description="split each prune stage into this many steps")
    batches: int = Field(2, ge=1, description="calibration batches the loss is measured on")
    rows: int | None = Field(None, ge=1, description="rows kept of each batch (default: all)")
    max_tokens: int | None = Field(
        None, ge=2, description="tokens kept of each row (default: all); sampling for big models"
    )


class ClusterConfig(Strict):
    executor: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    dashboard: bool = False


class OutputConfig(Strict):
    save_stage_models: bool = True
    plots: bool = True
    progress: bool = True


class GuardConfig(Strict):
    """After each prune step: NaN/Inf check, and optionally an accuracy-collapse bound.

    max_accuracy_drop: largest validation-accuracy drop one prune step may cause (before its
    recovery); beyond it the step is rolled back and retried smaller. None = no bound (pruning
    before recovery normally costs accuracy, and baselines must be measured as they are).
    """

    max_accuracy_drop: float | None = Field(None, gt=0.0, le=1.0)
    retries: int = Field(1, ge=0)
    retry_shrink: float = Field(0.5, gt=0.0, lt=1.0)


class DataSection(DataConfig):
    """The YAML `data:` section: the bearing data (runner/data/bearing.py DataConfig); a task adds its own
    keys (Task.options: causal_lm's `sources`) for jobs of that task."""


class EvaluationConfig(Strict):
    """Extra measurements of the dense model and of the exported checkpoint; a task adds its own
    keys (Task.options: causal_lm's choice tasks, prompts, blocks) for jobs of that task."""

    perplexity_file: str | None = Field(
        None, description="local UTF-8 text file: perplexity of a causal LM's backbone + LM head"
    )
    perplexity_window: int = Field(256, ge=2, description="tokens per non-overlapping window")
    perplexity_max_tokens: int = Field(50_000, ge=2)

    @field_validator("perplexity_file")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"file not found: {value}")
        return value


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
