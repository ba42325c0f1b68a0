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
    field_validator,
    model_validator,
)

from runner.choice_tasks import ChoiceTaskSpec
from runner.config_files import ConfigError, read_yaml_mapping
from runner.data import MAX_SEED, DataConfig
from runner.paths import dir_name_for_ref
from runner.tasks import get_task, task_names
from runner.text_sources import TextSource
from stages.base import stage_names
from stages.criteria import criteria_for, get_criterion

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def _safe_name(value: str) -> str:
    """Names become directory names: no path separators, no '.' or '..', nothing hidden."""
    if not _SAFE_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} cannot name a directory: use up to 100 letters, digits, '.', '_' or '-', "
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

    @model_validator(mode="after")
    def _budget_needs_device(self) -> TargetConfig:
        if self.fraction is not None and self.device is None:
            raise ValueError("fraction needs target.device")
        return self


class PruneStageConfig(Strict):
    """One pruning granularity. Amount: exactly one of ratio / count / share."""

    kind: Literal["layers", "heads", "channels"]
    name: str | None = None
    criterion: str = "wanda"
    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of units to remove")
    count: int | None = Field(None, ge=1, description="number of units to remove")
    share: float | None = Field(
        None, gt=0.0, le=1.0, description="share of the remaining parameter budget of target.ratio"
    )
    normalize: Literal["none", "mean", "max"] = "mean"
    bias_compensation: bool = False
    estimate_on: Literal["current", "dense"] = Field(
        "current", description="dense: score on the unpruned model once (one-shot baselines)"
    )

    @model_validator(mode="after")
    def _check(self) -> PruneStageConfig:
        allowed = criteria_for(self.kind)
        if self.criterion not in allowed:
            raise ValueError(
                f"criterion {self.criterion!r} is not valid for {self.kind}; choose from {', '.join(allowed)}"
            )
        given = [k for k in ("ratio", "count", "share") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of ratio, count, share (got {given or 'none'})")
        if self.bias_compensation and self.criterion != "fluctuation":
            raise ValueError("bias_compensation is only defined for criterion fluctuation (FLAP)")
        return self


# What a recover stage that leaves loss / teacher / kd_temperature unset gets, by task. Causal
# LMs distil the dense model's next-token distribution at T = 1: on SmolLM2 at 1.25x, at equal
# tokens, it recovered held-out validation perplexity far better than CE (docs/RESULTS.md
# "Distillation"); streamed jobs never hold the dense model, so they keep CE.
RECOVERY_DEFAULTS = {"causal_lm": {"loss": "kd", "teacher": "dense", "kd_temperature": 1.0}}
RECOVERY_DEFAULTS_OTHERS = {"loss": "ce", "teacher": "pre_stage", "kd_temperature": 2.0}


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


StageConfig = Annotated[PruneStageConfig | RecoverStageConfig, Field(discriminator="kind")]


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
    """The YAML `data:` section: the bearing data (runner/data.py DataConfig) and, for causal_lm
    jobs, local text sources (runner/text_sources.py): validation_fraction / test_fraction split
    their documents, calibration_size counts calibration blocks."""

    sources: list[TextSource] = Field(
        default_factory=list,
        description="causal_lm: files, folders, globs or builtin:<corpus>, one domain each",
    )


DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Explain in one sentence what a ball bearing does.",
    "Write a Python function that returns the square of a number.",
)


class EvaluationConfig(Strict):
    """Extra measurements of the dense model and of the exported checkpoint."""

    choice_tasks: list[ChoiceTaskSpec] = Field(
        default_factory=list,
        description="causal_lm: zero-shot multiple choice (bearing_qa, cloze or a JSONL file)",
    )
    stage_choice_items: int = Field(
        50, ge=0, description="causal_lm: items per choice task measured after every stage"
    )
    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        description="causal_lm: prompts whose greedy completions the report shows",
    )
    max_new_tokens: int = Field(32, ge=1, le=1024)
    test_blocks: int | None = Field(
        64, ge=1, description="causal_lm: test blocks per domain for perplexity (None: all)"
    )
    validation_blocks: int | None = Field(
        16, ge=1, description="causal_lm: validation blocks per domain measured after each stage"
    )

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
        description="what the model is for (runner/tasks): classification (bearing faults), "
        "embedding (a bare encoder distilled from its dense embeddings)",
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
        if not any(isinstance(s, PruneStageConfig) for s in self.stages):
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
    problems = []
    kinds = [s.kind for s in cfg.stages]
    first_recover = kinds.index("recover") if "recover" in kinds else len(kinds)
    for i, s in enumerate(cfg.stages):
        if s.kind == "recover":
            continue
        if i > first_recover:
            problems.append(
                f"stages.{i} ({names[i]}): calibration.streamed runs every prune stage before any "
                "recovery; move the recover stages after the last prune stage"
            )
        if not get_criterion(s.criterion).layer_local:
            local = [n for n in criteria_for(s.kind) if get_criterion(n).layer_local]
            problems.append(
                f"stages.{i}.criterion: {s.criterion} needs the whole model at once, which "
                f"calibration.streamed never holds; use {', '.join(local)}"
            )
        if s.estimate_on == "dense":
            problems.append(f"stages.{i}.estimate_on: dense scoring is not streamed; use current")
    problems += [
        f"stages.{i}.loss: kd needs a teacher cached from the model before the cut, which "
        "calibration.streamed never holds; use loss: ce"
        for i, s in enumerate(cfg.stages)
        if s.kind == "recover" and s.loss == "kd"
    ]
    if cfg.guards.max_accuracy_drop is not None:
        problems.append("guards.max_accuracy_drop: streamed stages are not evaluated one by one")
    if cfg.task == "embedding":
        problems.append("calibration.streamed: the embedding task needs the dense model's outputs")
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
    return _comparable(previous) == _comparable(cfg)


def _comparable(cfg: JobConfig) -> dict:
    dumped = cfg.model_dump(mode="json")
    for section, keys in _RESULT_NEUTRAL.items():
        for key in keys:
            dumped[section].pop(key, None)
    return dumped


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    return parse_config(read_yaml_mapping(path, overrides), str(path))


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
