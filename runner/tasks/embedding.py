"""Sentence embeddings: a bare encoder distilled from its own dense embeddings (bearing notes)."""

from __future__ import annotations

from typing import ClassVar

from runner.tasks.base import TaskData, chance_level_warning, register_task, text_only_problems
from runner.tasks.classification import bearing_figures, bearing_splits
from stages.objectives import get_objective


@register_task
class EmbeddingTask:
    """Every split row carries the dense model's embedding (`targets`); see
    stages/objectives/embedding.py for the two objectives. Accuracy is leave-one-out 1-NN fault
    classification with the embeddings, so guards, compare and batch work unchanged."""

    name: ClassVar[str] = "embedding"
    head: ClassVar[str] = "encoder"
    objective = get_objective("embedding")
    options = None

    def config_problems(self, cfg, stage_names: list[str]) -> list[str]:
        problems = [
            f"stages.{i} ({stage_names[i]}): loss kd needs class logits; embedding recovery always "
            "distils the dense model's embeddings, so leave loss at its default"
            for i, s in enumerate(cfg.stages)
            if s.kind == "recover" and s.loss == "kd"
        ]
        problems += [
            f"models.{i}.finetune_steps: fine-tuning trains a classification head, which the "
            "embedding task does not have"
            for i, m in enumerate(cfg.models)
            if m.finetune_steps
        ]
        if cfg.calibration.batch_size < 2:
            problems.append(
                "calibration.batch_size: the embedding importance loss compares rows within a "
                "batch; use at least 2"
            )
        problems += _batch_problems(cfg) + text_only_problems(cfg, self.name)
        if cfg.evaluation.perplexity_file is not None:
            problems.append(
                "evaluation.perplexity_file: perplexity needs a causal LM, not an embedding encoder"
            )
        if cfg.calibration.streamed:
            problems.append(
                "calibration.streamed: the embedding task needs the dense model's outputs"
            )
        return problems

    def load_kwargs(self, cfg) -> dict:
        return {}

    def build_data(self, cfg, model_cfg, model, tokenizer) -> TaskData:
        splits = bearing_splits(cfg, model_cfg, tokenizer)
        return TaskData({k: self.objective.dense_targets(model, v) for k, v in splits.items()})

    def prepare_dense(self, cfg, model_cfg, model, data: TaskData, log) -> dict | None:
        return None

    def evaluate(self, model, data: TaskData, split: str):
        return self.objective.evaluate(model, data.splits[split])

    def stage_metrics(self, model, data: TaskData) -> dict:
        result = self.evaluate(model, data, "validation")
        return {"accuracy": result.accuracy, "macro_f1": result.macro_f1, "cosine": result.cosine}

    def measure(self, model, data: TaskData) -> dict:
        return {s: self.evaluate(model, data, s) for s in ("test", "heldout")}

    def headline(self, measures: dict) -> float:
        return measures["test"].accuracy

    def final_figures(self, final: dict, dense: dict) -> dict:
        return bearing_figures(final, dense) | {
            "cosine": final["test"].cosine,
            "heldout_cosine": final["heldout"].cosine,
            "dense_cosine": dense["test"].cosine,
            "metric_note": "accuracy = leave-one-out 1-NN fault classification with the embeddings",
        }

    def dense_warnings(self, dense: dict) -> list[str]:
        test = dense["test"]
        warning = chance_level_warning(test.accuracy, len(test.confusion), "1-NN")
        return [warning] if warning else []


def _batch_problems(cfg) -> list[str]:
    problems = []
    for i, s in enumerate(cfg.stages):
        if s.kind != "recover":
            continue
        ray_train = s.runner == "ray_train"
        per_worker = -(-s.batch_size // cfg.cluster.workers) if ray_train else s.batch_size
        if per_worker < 2:
            who = "Ray Train worker" if ray_train else "step"
            problems.append(
                f"stages.{i}.batch_size: embedding distillation compares rows within a batch; "
                f"each {who} gets {per_worker}, needs >= 2"
            )
    return problems
