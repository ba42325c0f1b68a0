"""Adding a task touches no shared schema: a task registered here (and nowhere else) brings its
own job-file keys, its report.json figures and its part of the job and compare pages.

The toy task is the classification task with one more option (`evaluation.toy_margin`, refused on
other tasks' jobs) and one more figure (`toy_score`: test accuracy above a margin), all declared in
this file, as a new runner/tasks/<name>.py would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
from conftest import tiny_job
from pydantic import BaseModel, ConfigDict, Field

from runner.config import ConfigError, dump_config, parse_config, same_job
from runner.job import run_job
from runner.report.blocks import Paragraph, render_markdown
from runner.report.job import job_page
from runner.report.model import CompareRow, FinalFigures, Report, StageMetrics
from runner.tasks import base
from runner.tasks.classification import (
    BearingFigures,
    BearingMeasures,
    ClassificationTask,
    bearing_figures,
)


class ToyEvaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    toy_margin: float = Field(0.1, ge=0.0, le=1.0)


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    evaluation: ToyEvaluation = Field(default_factory=ToyEvaluation)


class ToyStageMetrics(StageMetrics):
    toy_gap: float | None = None


class ToyFigures(BearingFigures):
    toy_score: float
    toy_margin: float

    headline: ClassVar[str] = "Toy accuracy"

    def sections(self, report: Report) -> list:
        return [Paragraph(f"Toy score {self.toy_score:.4f} (margin {self.toy_margin:g}).")]

    def stage_columns(self, stages) -> list:
        cells = [f"{r.metrics(ToyStageMetrics).toy_gap:.4f}" for r in stages]
        return [("toy gap", "-", cells)]

    def compare_figures(self) -> dict:
        return super().compare_figures() | {"toy_score": self.toy_score}


@dataclass
class ToyMeasures(BearingMeasures):
    margin: float


class ToyTask(ClassificationTask):
    name: ClassVar[str] = "toy"
    options = ToyOptions
    figures = ToyFigures

    def build_data(self, cfg, model_cfg, model, tokenizer):
        data = super().build_data(cfg, model_cfg, model, tokenizer)
        data.extras["margin"] = cfg.evaluation.toy_margin
        return data

    def stage_metrics(self, model, data) -> ToyStageMetrics:
        result = self.evaluate(model, data, "validation")
        gap = result.accuracy - data.extras["margin"]
        return ToyStageMetrics(accuracy=result.accuracy, toy_gap=gap)

    def measure(self, model, data) -> ToyMeasures:
        bearing = super().measure(model, data)
        return ToyMeasures(bearing.test, bearing.heldout, data.extras["margin"])

    def final_figures(self, final, dense, shared: dict) -> ToyFigures:
        return ToyFigures(
            **shared,
            **bearing_figures(final, dense),
            toy_score=max(0.0, final.test.accuracy - final.margin),
            toy_margin=final.margin,
        )


@pytest.fixture
def toy(monkeypatch):
    """The toy task registered for one test (the registry as it was afterwards)."""
    monkeypatch.setattr(base, "_TASKS", dict(base._TASKS))
    base.register_task(ToyTask)
    return base.get_task("toy")


def toy_job(**overrides) -> dict:
    raw = tiny_job(task="toy", **overrides)
    raw["stages"] = [{"kind": "layers", "criterion": "block_influence", "count": 1}]
    raw["sia"] = {"enabled": False}
    raw["target"] = {}
    raw["evaluation"] = {"toy_margin": 0.25}
    return raw


def test_a_registered_task_brings_its_own_job_file_keys(toy) -> None:
    cfg = parse_config(toy_job())
    assert cfg.evaluation.toy_margin == 0.25 and cfg.evaluation.perplexity_file is None
    assert "toy_margin: 0.25" in dump_config(cfg) and same_job(dump_config(cfg), cfg)
    with pytest.raises(ConfigError) as err:
        parse_config(toy_job() | {"evaluation": {"toy_margin": 2.0}})
    assert "evaluation.toy_margin: Input should be less than or equal to 1" in str(err.value)

    other = toy_job() | {"task": "classification"}  # another task's job: the key is refused
    with pytest.raises(ConfigError) as err:
        parse_config(other)
    assert "evaluation.toy_margin: an option of task toy" in str(err.value)
    other["evaluation"] = {"toy_margin": 0.1}  # at its default (an older job.yaml): ignored
    assert not hasattr(parse_config(other).evaluation, "toy_margin")


@pytest.mark.slow
def test_a_registered_task_reports_its_own_figures_and_sections(toy, tmp_path) -> None:
    (report,) = run_job(parse_config(toy_job()), tmp_path, log=lambda m: None).values()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == report and saved["task"] == "toy"
    final = saved["final"]
    assert final["toy_score"] == pytest.approx(max(0.0, final["accuracy"] - 0.25))
    gap = saved["stages"][0]["toy_gap"]
    assert gap == pytest.approx(saved["stages"][0]["accuracy"] - 0.25)

    typed = Report.read(tmp_path / "report.json")
    assert isinstance(typed.final, ToyFigures) and isinstance(typed.final, FinalFigures)
    page = render_markdown(job_page(typed, None, figures=False))
    assert f"Toy score {final['toy_score']:.4f} (margin 0.25)." in page
    assert "Toy accuracy **" in page and f"| {gap:.4f} |" in page and "toy gap" in page
    assert f"Toy score {final['toy_score']:.4f}" in (tmp_path / "report.md").read_text()

    row = CompareRow(model="m", method="cascade", ratio=2.0, dir=str(tmp_path))
    assert row.with_report(typed).to_json()["toy_score"] == final["toy_score"]
