"""The two things a model's cascade passes around: a fixed context and the changing state.

`RunContext` holds what stays fixed for one model's run (config, task, data, executor, event log,
stage store, facts about the dense model); `RunState` holds what every stage changes (the model
version, its adapter, which dense layer each remaining layer came from, cached teachers, finished
stage records). Stage functions take both explicitly, so what each one reads and writes is visible
in its signature instead of hiding in a host object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from cluster.executor import Executor
from runner.config import JobConfig, ModelConfig
from runner.events import EventLog
from runner.stage_store import StageStore
from runner.tasks import Task, TaskData
from stages.base import param_count
from stages.objectives import Teacher
from stages.stage_plan import PlanLimits


@dataclass
class DenseFacts:
    """The dense model as measured before anything is cut (the report's reference point)."""

    params: int
    info: dict  # runner.models.describe_model
    measures: Any  # what the task's final report compares (Task.measure on the dense model)
    finetune: dict | None  # the task head's fine-tune record, if one ran
    warnings: list[str]
    perplexity: dict | None
    layout: list[dict] | None = None  # per-layer shapes: the report's dense "per layer" column


@dataclass
class RunContext:
    cfg: JobConfig
    model_cfg: ModelConfig
    task: Task
    out: Path
    log: Callable[[str], None]
    events: EventLog
    store: StageStore
    tokenizer: Any
    data: TaskData
    calibration: list[dict]
    executor: Executor
    dense: DenseFacts
    params_target: int | None
    perplexity: Any = None  # runner.lm_head.PerplexityProbe when evaluation names a file

    @property
    def objective_name(self) -> str:
        return self.task.objective.name

    @property
    def limits(self) -> PlanLimits:
        """The parameter target and layout every prune stage's plan respects."""
        return self.cfg.target.plan_limits(self.params_target)


@dataclass
class RunState:
    model: nn.Module
    adapter: Any
    version: int = 0
    layer_origin: list[int] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    teachers: dict[str, Teacher] = field(default_factory=dict)
    dense_estimates: dict = field(default_factory=dict)  # (kind, criterion) -> scores

    def snapshot(self) -> dict:
        return {"params": param_count(self.model), "version": self.version}
