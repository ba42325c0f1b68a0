"""The Task protocol: what a job's task decides, so the cascade itself never branches on it.

A task chooses the head the model loads with, builds the data (train / validation / test /
calibration splits, plus whatever its metrics need), names the objective every stage
differentiates (stages/objectives), owns its part of the job file (`options`), says which metrics
a stage record and the final report carry (`figures`: its report.json "final" and page sections),
and which config options make no sense for it. Adding a task = one new module in runner/tasks
that calls `register_task`; no shared schema changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel
from torch import nn

from runner.report.model import FinalFigures, StageMetrics
from stages.metrics import EvalResult
from stages.objectives import Objective
from stages.split import EncodedSplit


@dataclass
class TaskData:
    """Splits every stage reads (train, validation, test, calibration; `final_splits` too) and
    whatever else the task's own metrics need (`extras`)."""

    splits: dict[str, EncodedSplit]
    extras: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: ClassVar[str]
    head: ClassVar[str]  # models.Head: classification | encoder | causal_lm
    objective: ClassVar[Objective]
    # The task's part of the job file (None: nothing of its own): a pydantic model with one field
    # per section it adds keys to (`data`, `evaluation`, ...), each a model of those keys (extra
    # forbidden). runner.config.job_schema merges them into that section for this task's jobs only.
    options: ClassVar[type[BaseModel] | None]
    # Its report.json "final": a subclass of FinalFigures with its figures and its page sections.
    figures: ClassVar[type[FinalFigures]]

    def config_problems(self, cfg, stage_names: list[str]) -> list[str]:
        """Options of `cfg` (a JobConfig) that mean nothing for this task, as messages."""
        ...

    def load_kwargs(self, cfg) -> dict:
        """Extra arguments of runner.models.load_model (e.g. num_labels of a new head)."""
        ...

    def build_data(self, cfg, model_cfg, model: nn.Module, tokenizer) -> TaskData: ...

    def prepare_dense(self, cfg, model_cfg, model: nn.Module, data: TaskData, log) -> dict | None:
        """Whatever the dense model needs before pruning (a task head's fine-tune); its record."""
        ...

    def evaluate(self, model: nn.Module, data: TaskData, split: str) -> EvalResult:
        """One split's metrics (guards compare validation `accuracy` before and after a cut)."""
        ...

    def stage_metrics(self, model: nn.Module, data: TaskData) -> StageMetrics:
        """What a stage record shows (validation split): the task's StageMetrics model."""
        ...

    def measure(self, model: nn.Module, data: TaskData) -> Any:
        """Everything the final report compares (the task's own type, read only by its methods
        below), measured once on the dense model and once on the exported checkpoint."""
        ...

    def headline(self, measures: Any) -> float:
        """The one accuracy figure events, summaries and compare tables show."""
        ...

    def final_figures(self, final: Any, dense: Any | None, shared: dict) -> FinalFigures:
        """report.json "final" from two `measure` results (dense None: a streamed run never
        measured the dense model, its side stays empty) and the figures every task reports
        (`shared`: params, compression, ...): an instance of `figures`."""
        ...

    def dense_warnings(self, dense: Any) -> list[str]: ...


_TASKS: dict[str, Task] = {}


def register_task(cls: type) -> type:
    _TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(_TASKS))}") from None


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)


def text_only_problems(cfg, task: str) -> list[str]:
    """The recover loss only a causal_lm job has, set on a job of another task (the task's own
    options are refused by the job schema: runner.config.job_schema)."""
    return [
        f"stages.{i}.loss: lm is next-token cross-entropy, for task causal_lm; the {task} "
        "task's own loss is ce"
        for i, s in enumerate(cfg.stages)
        if s.kind == "recover" and s.loss == "lm"
    ]


def chance_level_warning(accuracy: float, classes: int, what: str) -> str | None:
    """A dense model no better than guessing makes every pruning figure meaningless: say so loudly."""
    chance = 1.0 / max(classes, 1)
    if classes < 2 or accuracy > 1.5 * chance:
        return None
    return (
        f"the dense model's {what} test accuracy {accuracy:.4f} is at chance level ({chance:.4f} for "
        f"{classes} classes): compression figures say nothing about it; check the model, the data "
        "and, for a fine-tuned head, finetune_steps/finetune_lr"
    )
