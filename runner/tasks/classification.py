"""The paper's task: bearing-fault classification from vibration features serialised as text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from runner.data.bearing import CLASS_NAMES, build_dataset
from runner.finetune import finetune_dense
from runner.report.blocks import Block, Heading, Image, fmt_num
from runner.report.model import FinalFigures, Report, StageMetrics
from runner.tasks.base import TaskData, chance_level_warning, register_task, text_only_problems
from stages.metrics import EvalResult
from stages.objectives import get_objective
from stages.split import encode_split

BEARING_SPLITS = ("train", "validation", "test", "heldout", "calibration")


def bearing_splits(cfg, model_cfg, tokenizer) -> dict:
    """The bearing data's five splits, tokenised once (heldout = loads never trained on)."""
    data = build_dataset(cfg.data)
    return {
        name: encode_split(data[name], tokenizer, model_cfg.max_length) for name in BEARING_SPLITS
    }


@dataclass
class BearingMeasures:
    """What the final report compares: the test split and the held-out loads."""

    test: EvalResult
    heldout: EvalResult


class BearingStageMetrics(StageMetrics):
    macro_f1: float | None = None


class BearingFigures(FinalFigures):
    """Test and held-out-load accuracy, macro-F1 and the test confusion matrix, exported vs
    dense (dense None: a streamed run)."""

    macro_f1: float | None = None
    heldout_accuracy: float | None = None
    dense_macro_f1: float | None = None
    dense_heldout_accuracy: float | None = None
    confusion: list[list[int]] | None = None

    picture_files: ClassVar[tuple[str, ...]] = ("confusion.png",)

    def summary_figures(self) -> list[str]:
        parts = []
        if self.macro_f1 is not None:
            parts.append(f"macro-F1 {fmt_num(self.macro_f1)}")
        if self.heldout_accuracy is not None:
            dense = fmt_num(self.dense_heldout_accuracy)
            parts.append(f"held-out load accuracy {fmt_num(self.heldout_accuracy)} (dense {dense})")
        return parts

    def pictures(self, report: Report) -> dict[str, Callable[[], bytes]]:
        if not self.confusion:
            return {}

        def draw() -> bytes:
            # lazy: start-up cost (matplotlib); every command imports the tasks, few draw
            from runner.report.figures import confusion_figure

            return confusion_figure(self.confusion)

        return {"confusion.png": draw}

    def picture_sections(self, figures: bool) -> list[Block]:
        if not (figures and self.confusion):
            return []
        return [Heading("Confusion matrix"), Image("confusion matrix", "plots/confusion.png")]

    def compare_figures(self) -> dict:
        return {"macro_f1": self.macro_f1, "heldout_accuracy": self.heldout_accuracy}

    def family_figures(self) -> dict:
        return self.compare_figures()


def bearing_figures(final: BearingMeasures, dense: BearingMeasures | None) -> dict:
    """The bearing figures of BearingFigures from two `measure` results."""
    test = final.test
    return {
        "accuracy": test.accuracy,
        "macro_f1": test.macro_f1,
        "heldout_accuracy": final.heldout.accuracy,
        "dense_accuracy": dense.test.accuracy if dense else None,
        "dense_macro_f1": dense.test.macro_f1 if dense else None,
        "dense_heldout_accuracy": dense.heldout.accuracy if dense else None,
        "confusion": test.confusion,
    }


@register_task
class ClassificationTask:
    name: ClassVar[str] = "classification"
    head: ClassVar[str] = "classification"
    objective = get_objective("classification")
    options = None
    figures = BearingFigures

    def config_problems(self, cfg, stage_names: list[str]) -> list[str]:
        return text_only_problems(cfg, self.name)

    def load_kwargs(self, cfg) -> dict:
        return {"num_labels": len(CLASS_NAMES)}

    def build_data(self, cfg, model_cfg, model, tokenizer) -> TaskData:
        return TaskData(bearing_splits(cfg, model_cfg, tokenizer))

    def prepare_dense(self, cfg, model_cfg, model, data: TaskData, log) -> dict | None:
        return finetune_dense(
            model, data.splits["train"], model_cfg, cfg.seed, cfg.output.progress, log,
            data_cfg=cfg.data,
        )  # fmt: skip

    def evaluate(self, model, data: TaskData, split: str):
        return self.objective.evaluate(model, data.splits[split])

    def stage_metrics(self, model, data: TaskData) -> BearingStageMetrics:
        result = self.evaluate(model, data, "validation")
        return BearingStageMetrics(accuracy=result.accuracy, macro_f1=result.macro_f1)

    def measure(self, model, data: TaskData) -> BearingMeasures:
        return BearingMeasures(*(self.evaluate(model, data, s) for s in ("test", "heldout")))

    def headline(self, measures: BearingMeasures) -> float:
        return measures.test.accuracy

    def final_figures(self, final, dense, shared: dict) -> BearingFigures:
        return BearingFigures(**shared, **bearing_figures(final, dense))

    def dense_warnings(self, dense: BearingMeasures) -> list[str]:
        test = dense.test
        warning = chance_level_warning(test.accuracy, len(test.confusion), "classification")
        return [warning] if warning else []
