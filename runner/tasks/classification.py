"""The paper's task: bearing-fault classification from vibration features serialised as text."""

from __future__ import annotations

from typing import ClassVar

from runner.data import CLASS_NAMES, build_dataset
from runner.finetune import finetune_dense
from runner.tasks.base import TaskData, chance_level_warning, register_task, text_only_problems
from stages.objectives import get_objective
from stages.split import encode_split

BEARING_SPLITS = ("train", "validation", "test", "heldout", "calibration")


def bearing_splits(cfg, model_cfg, tokenizer) -> dict:
    """The bearing data's five splits, tokenised once (heldout = loads never trained on)."""
    data = build_dataset(cfg.data)
    return {
        name: encode_split(data[name], tokenizer, model_cfg.max_length) for name in BEARING_SPLITS
    }


def bearing_figures(final: dict, dense: dict) -> dict:
    """Test and held-out-load accuracy, macro-F1 and confusion, exported vs dense."""
    test, dense_test = final["test"], dense["test"]
    return {
        "accuracy": test.accuracy,
        "macro_f1": test.macro_f1,
        "heldout_accuracy": final["heldout"].accuracy,
        "dense_accuracy": dense_test.accuracy,
        "dense_macro_f1": dense_test.macro_f1,
        "dense_heldout_accuracy": dense["heldout"].accuracy,
        "confusion": test.confusion,
    }


@register_task
class ClassificationTask:
    name: ClassVar[str] = "classification"
    head: ClassVar[str] = "classification"
    objective = get_objective("classification")
    options = None

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

    def stage_metrics(self, model, data: TaskData) -> dict:
        result = self.evaluate(model, data, "validation")
        return {"accuracy": result.accuracy, "macro_f1": result.macro_f1}

    def measure(self, model, data: TaskData) -> dict:
        return {s: self.evaluate(model, data, s) for s in ("test", "heldout")}

    def headline(self, measures: dict) -> float:
        return measures["test"].accuracy

    def final_figures(self, final: dict, dense: dict) -> dict:
        return bearing_figures(final, dense)

    def dense_warnings(self, dense: dict) -> list[str]:
        test = dense["test"]
        warning = chance_level_warning(test.accuracy, len(test.confusion), "classification")
        return [warning] if warning else []
