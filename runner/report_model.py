"""report.json as one typed model: built once at the end of a run, read by every renderer.

The JSON keys are the contract other tools read (docs/ARCHITECTURE.md). Task-specific figures are
optional fields that only the tasks producing them set; `to_json` writes the fields that were set,
so a classification report carries no empty embedding or language-model fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInfo(_Part):
    name: str
    architecture: str
    attention: str
    mlp: str
    params: int


class SiaResult(BaseModel):
    """Empty when the check was disabled; see stages/sia.py for the fields."""

    model_config = ConfigDict(extra="allow")
    score: float | None = None
    threshold: float | None = None
    satisfied: bool | None = None
    per_granularity: dict[str, float] | None = None
    details: dict[str, Any] | None = None
    policy: str | None = None


class StageRecord(BaseModel):
    """One finished stage; the task's validation metrics ride along (accuracy, cosine, ...)."""

    model_config = ConfigDict(extra="allow")
    index: int
    name: str
    kind: str
    version: int
    params_before: int
    params_after: int
    accuracy: float | None  # None: a streamed prune stage, measured only after the last one
    macro_f1: float | None = None
    cosine: float | None = None
    perplexity: float | None = None  # causal_lm: validation perplexity
    choice_acc_norm: dict[str, float] | None = None  # causal_lm: a sample of each choice task
    seconds: float
    criterion: str | None = None
    layer_origin: list[int] = []


class DomainPerplexity(_Part):
    """Test perplexity of one text domain (data.sources entry), pruned vs dense."""

    pruned: float
    dense: float | None
    tokens: int


class ChoiceAccuracy(_Part):
    """Zero-shot multiple choice as lm-evaluation-harness scores it (acc, length-normalised)."""

    acc: float
    acc_norm: float
    dense_acc: float | None
    dense_acc_norm: float | None
    n: int


class Generation(_Part):
    """Greedy completion of one fixed prompt by the dense and by the pruned model."""

    prompt: str
    dense: str | None
    pruned: str


class FinalFigures(_Part):
    """Measured on the exported checkpoint reloaded from disk, next to the dense model."""

    params: int
    dense_params: int
    compression_ratio: float
    accuracy: float
    macro_f1: float | None = None
    heldout_accuracy: float | None = None
    dense_accuracy: float | None  # None: a streamed run never holds the dense model whole
    dense_macro_f1: float | None = None
    dense_heldout_accuracy: float | None = None
    confusion: list[list[int]] | None = None
    dense_finetune: dict[str, Any] | None = None
    # embedding task
    cosine: float | None = None
    heldout_cosine: float | None = None
    dense_cosine: float | None = None
    metric_note: str | None = None
    # evaluation.perplexity_file
    perplexity: dict[str, Any] | None = None
    # causal_lm task (accuracy = next-token top-1 accuracy on the test blocks)
    lm_perplexity: float | None = None
    dense_lm_perplexity: float | None = None
    perplexity_by_domain: dict[str, DomainPerplexity] | None = None
    choice_accuracy: dict[str, ChoiceAccuracy] | None = None
    generations: list[Generation] | None = None
    # which serving engines load the export (runner/engines.py)
    engines: dict[str, str] | None = None
    checkpoint: str | None = None


class Timing(_Part):
    total_seconds: float
    per_stage: dict[str, float]


class JobInfo(_Part):
    name: str
    seed: int
    executor: str
    workers: int


class Report(_Part):
    model: ModelInfo
    sia: SiaResult
    warnings: list[str] = []
    stages: list[StageRecord]
    final: FinalFigures
    validation: dict[str, Any] | None = None
    timing: Timing
    job: JobInfo | None = None

    def to_json(self) -> dict:
        """The report.json content: the fields that were set, JSON types only."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def read(cls, path: str | Path) -> Report:
        return cls.model_validate(json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------- typed views
class _View(BaseModel):
    """A typed reading of a free-form part of report.json (kept a dict there, so its keys and their
    order stay exactly as the writer made them); unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")


class DenseFinetune(_View):
    """final.dense_finetune, written by runner/finetune.py."""

    steps: int
    lr: float
    first_loss: float
    last_loss: float
    cached: bool = False


class Perplexity(_View):
    """final.perplexity, written by runner/lm_head.py (+ the dense model's figure)."""

    file: str
    tokens: int
    window: int | None = None
    perplexity: float
    dense: float | None = None


class DeviceFit(_View):
    """report.validation, written by runner/validate.py."""

    device: str
    budget_bytes: float
    peak_bytes: float
    fits: bool
    dense_peak_bytes: float | None = None
    latency_ms: dict[str, float | None] | None = None


# ----------------------------------------------------------------------------- compare / family rows
class _Row(BaseModel):
    """A line of compare.json / family.json. Field order is the JSON key order; `to_json` writes
    only the fields that were set, so a failed row carries its error and no empty figures."""

    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude_unset=True)


class CompareRow(_Row):
    """One method at one ratio of `cascade compare`: the run's headline figures, or its error."""

    model: str
    ref: str | None = None
    method: str
    ratio: float
    dir: str
    error: str | None = None
    architecture: str | None = None
    attention: str | None = None
    mlp: str | None = None
    achieved_ratio: float | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    heldout_accuracy: float | None = None
    params: int | None = None
    dense_accuracy: float | None = None
    seconds: float | None = None
    sia_score: float | None = None
    sia_satisfied: bool | None = None
    # causal_lm task
    lm_perplexity: float | None = None
    dense_lm_perplexity: float | None = None
    perplexity_by_domain: dict[str, DomainPerplexity] | None = None
    choice_accuracy: dict[str, ChoiceAccuracy] | None = None

    def with_report(self, report: Report) -> CompareRow:
        f = report.final
        return self.model_validate(
            self.to_json()
            | {
                "architecture": report.model.architecture,
                "attention": report.model.attention,
                "mlp": report.model.mlp,
                "achieved_ratio": f.compression_ratio,
                "accuracy": f.accuracy,
                "macro_f1": f.macro_f1,
                "heldout_accuracy": f.heldout_accuracy,
                "params": f.params,
                "dense_accuracy": f.dense_accuracy,
                "seconds": report.timing.total_seconds,
                "sia_score": report.sia.score,
                "sia_satisfied": report.sia.satisfied,
            }
            | _language_figures(f)
        )


def _language_figures(f: FinalFigures) -> dict:
    """A causal LM's perplexities and choice accuracies (absent, not null, for other tasks)."""
    figures = {
        "lm_perplexity": f.lm_perplexity,
        "dense_lm_perplexity": f.dense_lm_perplexity,
        "perplexity_by_domain": f.perplexity_by_domain,
        "choice_accuracy": f.choice_accuracy,
    }
    return {k: v for k, v in figures.items() if v is not None}


class CompareResult(_Part):
    """compare.json."""

    name: str
    methods: list[str]
    ratios: list[float]
    recovery_steps: int | None = None
    recovery_tokens: int | None = None
    rows: list[CompareRow]

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def read(cls, path: str | Path) -> CompareResult:
        return cls.model_validate(json.loads(Path(path).read_text()))


Number = int | float  # copied through as written (a byte budget may be either)


class FamilyRow(_Row):
    """One model of `cascade batch`: status, error, headline figures, SIA and device fit."""

    model: str
    ref: str
    dir: str
    status: str
    error: str | None = None
    architecture: str | None = None
    attention: str | None = None
    mlp: str | None = None
    dense_params: int | None = None
    params: int | None = None
    compression_ratio: float | None = None
    accuracy: float | None = None
    dense_accuracy: float | None = None
    macro_f1: float | None = None
    heldout_accuracy: float | None = None
    sia_score: float | None = None
    sia_threshold: float | None = None
    sia_satisfied: bool | None = None
    device: str | None = None
    budget_bytes: Number | None = None
    peak_bytes: Number | None = None
    fits: bool | None = None
    seconds: float | None = None

    @classmethod
    def from_result(cls, name: str, ref: str, out: Path, result: dict) -> FamilyRow:
        """From batch's result of one job: status, error?, report? (report.json's content),
        seconds?. A model without a report keeps its error and time only."""
        row: dict[str, Any] = dict(model=name, ref=ref, dir=str(out), status=result["status"])
        row |= {"error": result["error"]} if "error" in result else {}
        if not result.get("report"):
            seconds = {"seconds": result["seconds"]} if "seconds" in result else {}
            return cls.model_validate(row | seconds)
        rep = Report.model_validate(result["report"])
        f, sia, val = rep.final, rep.sia, rep.validation or {}
        row |= dict(architecture=rep.model.architecture, attention=rep.model.attention)
        row |= dict(mlp=rep.model.mlp, dense_params=f.dense_params, params=f.params)
        row |= dict(compression_ratio=f.compression_ratio, accuracy=f.accuracy)
        row |= dict(dense_accuracy=f.dense_accuracy, macro_f1=f.macro_f1)
        row |= dict(heldout_accuracy=f.heldout_accuracy, sia_score=sia.score)
        row |= dict(sia_threshold=sia.threshold, sia_satisfied=sia.satisfied)
        row |= {k: val.get(k) for k in ("device", "budget_bytes", "peak_bytes", "fits")}
        return cls.model_validate(row | {"seconds": rep.timing.total_seconds})


class Execution(_Part):
    mode: str
    cpus_per_job: float
    gpus_per_job: float


class FamilySummary(BaseModel):
    """family.json, as the family page reads it (batch.build_summary writes it)."""

    model_config = ConfigDict(extra="ignore")
    name: str
    description: str = ""
    method: str
    target: dict[str, Any]
    recovery_steps: int | None = None
    execution: Execution
    concurrency: int | None = None
    seconds: float
    counts: dict[str, int]
    models: list[FamilyRow]

    @classmethod
    def read(cls, path: str | Path) -> FamilySummary:
        return cls.model_validate(json.loads(Path(path).read_text()))
