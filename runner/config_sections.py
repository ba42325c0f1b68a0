"""The sections of a job's YAML (models, calibration, target, recover stages, recovery, sia,
cluster, output, guards, data, evaluation) and the task defaults a recover or prune stage gets.

runner/config.py puts them together into JobConfig and checks what spans sections."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from runner.data.bearing import DataConfig
from runner.paths import dir_name_for_ref, shown
from stages.prune_stage import PruneStage
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
