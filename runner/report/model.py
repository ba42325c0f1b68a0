"""report.json as one typed model: built once at the end of a run, read by every renderer.

The JSON keys are the contract other tools read (docs/ARCHITECTURE.md). What every task reports
lives here; a task's own figures are its subclass of `FinalFigures` (`Task.figures`, picked by
report.json's `task`), its stage metrics ride along a `StageRecord` (typed by its `StageMetrics`),
and its compare / family row figures ride along a row; the pages ask the figures for the task's
sections. `to_json` writes the fields that were set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, SerializeAsAny, ValidationInfo, WrapValidator

if TYPE_CHECKING:
    from runner.report.blocks import Block


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


class StageMetrics(BaseModel):
    """What a task measures after every stage (Task.stage_metrics; validation split). A task adds
    its own fields; they ride along the stage record (metrics.json, report.json "stages")."""

    model_config = ConfigDict(extra="ignore")  # read back from a whole stage record
    accuracy: float | None = None  # None: a streamed prune stage, measured only after the last one


M = TypeVar("M", bound=StageMetrics)


class StageRecord(BaseModel):
    """One finished stage; the task's validation metrics ride along (`metrics` reads them)."""

    model_config = ConfigDict(extra="allow")
    index: int
    name: str
    kind: str
    version: int
    params_before: int
    params_after: int
    accuracy: float | None  # None: a streamed prune stage, measured only after the last one
    seconds: float
    criterion: str | None = None
    layer_origin: list[int] = []

    def metrics(self, model: type[M]) -> M:
        """This stage's metrics as the task's `StageMetrics` model reads them."""
        return model.model_validate(self.model_dump())


StageColumn = tuple[str, str, list[str]]  # header, the dense row's cell, one cell per stage


class FinalFigures(_Part):
    """report.json "final": measured on the exported checkpoint reloaded from disk, next to the
    dense model. These are every task's; a task subclasses it with its own figures and overrides
    the hooks below to show them (the defaults show nothing more)."""

    params: int
    dense_params: int
    compression_ratio: float
    accuracy: float  # the task's headline figure (Task.headline)
    dense_accuracy: float | None  # None: a streamed run never holds the dense model whole
    dense_finetune: dict[str, Any] | None = None
    perplexity: dict[str, Any] | None = None  # evaluation.perplexity_file
    engines: dict[str, str] | None = None  # which serving engines load the export
    checkpoint: str | None = None

    headline: ClassVar[str] = "Test accuracy"  # what the job page calls `accuracy`
    stages_caption: ClassVar[str] = "accuracy per stage"  # the picture plots/stages.png shows
    picture_files: ClassVar[tuple[str, ...]] = ()  # plots/ files only this task draws

    def summary_figures(self) -> list[str]:
        """More figures for the summary sentence, after the headline ("macro-F1 0.9")."""
        return []

    def sections(self, report: Report) -> list[Block]:
        """The task's own part of the job page (after the fine-tune paragraph)."""
        return []

    def stage_columns(self, stages: list[StageRecord]) -> list[StageColumn]:
        """Extra columns of the stage table."""
        return []

    def pictures(self, report: Report) -> dict[str, Callable[[], bytes]]:
        """The task's pictures by file name under plots/ ("stages.png" replaces the shared one)."""
        return {}

    def picture_sections(self, figures: bool) -> list[Block]:
        """The task's pictures on the job page (after the layer breakdown)."""
        return []

    def compare_figures(self) -> dict:
        """The task's figures a `cascade compare` row carries (JSON, as in report.json)."""
        return {}

    def family_figures(self) -> dict:
        """The task's figures a `cascade batch` row carries (JSON, as in report.json)."""
        return {}

    @classmethod
    def compare_note(cls, rows: list[CompareRow]) -> str:
        """What the comparison's opening sentence adds for this task's rows ("" for none)."""
        return ""

    @classmethod
    def compare_section(
        cls, out_dir: Path, rows: list[CompareRow], methods: list[str]
    ) -> list[Block]:
        """Blocks after one model's comparison table, for this task's rows ([] for none)."""
        return []


def task_figures(task: str) -> type[FinalFigures]:
    """The figures model of a task (Task.figures)."""
    from runner.tasks import get_task  # lazy: registration cycle by design (tasks subclass these)

    return get_task(task).figures


def every_task_figures() -> list[type[FinalFigures]]:
    """Every registered task's figures model (pages that show rows of any task ask them all)."""
    from runner.tasks import get_task, task_names  # lazy: registration cycle by design

    return list(dict.fromkeys(get_task(name).figures for name in task_names()))


def _legacy_task(final: dict) -> str:
    """The task of a report written before report.json named it, told by the figures only that
    task wrote then (frozen: every report since names its task)."""
    if "lm_perplexity" in final:
        return "causal_lm"
    return "embedding" if "cosine" in final else "classification"


def _task_final(value: Any, handler, info: ValidationInfo) -> FinalFigures:
    if isinstance(value, FinalFigures) or not isinstance(value, dict):
        return handler(value)
    task = info.data.get("task") or _legacy_task(value)
    try:
        figures = task_figures(task)
    except ValueError as exc:
        raise ValueError(f"task {task!r} of this report: {exc}") from None
    return figures.model_validate(value)


class Timing(_Part):
    total_seconds: float
    per_stage: dict[str, float]


class JobInfo(_Part):
    name: str
    seed: int
    executor: str
    workers: int


class Report(_Part):
    task: str | None = None  # runner/tasks name; None: written before reports named it
    model: ModelInfo
    sia: SiaResult
    warnings: list[str] = []
    stages: list[StageRecord]
    final: Annotated[SerializeAsAny[FinalFigures], WrapValidator(_task_final)]
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
    """A line of compare.json / family.json. Field order is the JSON key order (a task's own
    figures follow); `to_json` writes only the fields that were set, so a failed row carries its
    error and no empty figures."""

    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> dict:
        return self.model_dump(mode="json", exclude_unset=True)


class CompareRow(_Row):
    """One method at one ratio of `cascade compare`: the run's headline figures, or its error;
    the task's own figures (FinalFigures.compare_figures) ride along after these."""

    model_config = ConfigDict(extra="allow")
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
    params: int | None = None
    dense_accuracy: float | None = None
    seconds: float | None = None
    sia_score: float | None = None
    sia_satisfied: bool | None = None

    @property
    def figures(self) -> dict:
        """The task's own figures of this row (as JSON)."""
        return dict(self.model_extra or {})

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
                "params": f.params,
                "dense_accuracy": f.dense_accuracy,
                "seconds": report.timing.total_seconds,
                "sia_score": report.sia.score,
                "sia_satisfied": report.sia.satisfied,
            }
            | f.compare_figures()
        )


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
    """One model of `cascade batch`: status, error, headline figures, SIA and device fit; the
    task's own figures (FinalFigures.family_figures) ride along after these."""

    model_config = ConfigDict(extra="allow")
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
        row |= dict(dense_accuracy=f.dense_accuracy, sia_score=sia.score)
        row |= dict(sia_threshold=sia.threshold, sia_satisfied=sia.satisfied)
        row |= {k: val.get(k) for k in ("device", "budget_bytes", "peak_bytes", "fits")}
        return cls.model_validate(row | {"seconds": rep.timing.total_seconds} | f.family_figures())


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
