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
    accuracy: float
    macro_f1: float | None = None
    cosine: float | None = None
    seconds: float
    criterion: str | None = None
    layer_origin: list[int] = []


class FinalFigures(_Part):
    """Measured on the exported checkpoint reloaded from disk, next to the dense model."""

    params: int
    dense_params: int
    compression_ratio: float
    accuracy: float
    macro_f1: float | None = None
    heldout_accuracy: float | None = None
    dense_accuracy: float
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
