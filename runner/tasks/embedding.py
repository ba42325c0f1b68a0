"""Sentence embeddings: a bare encoder distilled from its own dense embeddings (bearing notes)."""

from __future__ import annotations

from typing import ClassVar

from runner.report.blocks import Block, Em, Paragraph, fmt_num
from runner.report.model import Report, StageColumn, StageRecord
from runner.tasks.base import TaskData, chance_level_warning, register_task, text_only_problems
from runner.tasks.classification import (
    BearingFigures,
    BearingMeasures,
    BearingStageMetrics,
    bearing_figures,
    bearing_splits,
)
from stages.objectives import get_objective


class EmbeddingStageMetrics(BearingStageMetrics):
    cosine: float | None = None


class EmbeddingFigures(BearingFigures):
    """The bearing figures (accuracy: leave-one-out 1-NN fault classification with the
    embeddings) and the mean cosine similarity to the dense embeddings."""

    cosine: float
    heldout_cosine: float | None = None
    dense_cosine: float | None = None
    metric_note: str | None = None

    def sections(self, report: Report) -> list[Block]:
        return [
            Paragraph(
                "Embedding model: mean cosine similarity to the dense embeddings ",
                Em(fmt_num(self.cosine)),
                f" on test sentences, {fmt_num(self.heldout_cosine)} on held-out-load sentences "
                "(never distilled on). Accuracy above is leave-one-out 1-NN fault classification "
                "with the embeddings.",
            )
        ]

    def stage_columns(self, stages: list[StageRecord]) -> list[StageColumn]:
        metrics = [r.metrics(EmbeddingStageMetrics) for r in stages]
        if not any(m.cosine is not None for m in metrics):
            return []
        return [("cosine", fmt_num(self.dense_cosine), [fmt_num(m.cosine) for m in metrics])]


@register_task
class EmbeddingTask:
    """Every split row carries the dense model's embedding (`targets`); see
    stages/objectives/embedding.py for the two objectives. Accuracy is leave-one-out 1-NN fault
    classification with the embeddings, so guards, compare and batch work unchanged."""

    name: ClassVar[str] = "embedding"
    head: ClassVar[str] = "encoder"
    objective = get_objective("embedding")
    options = None
    figures = EmbeddingFigures

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

    def stage_metrics(self, model, data: TaskData) -> EmbeddingStageMetrics:
        result = self.evaluate(model, data, "validation")
        return EmbeddingStageMetrics(
            accuracy=result.accuracy, macro_f1=result.macro_f1, cosine=result.cosine
        )

    def measure(self, model, data: TaskData) -> BearingMeasures:
        return BearingMeasures(*(self.evaluate(model, data, s) for s in ("test", "heldout")))

    def headline(self, measures: BearingMeasures) -> float:
        return measures.test.accuracy

    def final_figures(self, final, dense, shared: dict) -> EmbeddingFigures:
        return EmbeddingFigures(
            **shared,
            **bearing_figures(final, dense),
            cosine=final.test.cosine,
            heldout_cosine=final.heldout.cosine,
            dense_cosine=dense.test.cosine if dense else None,
            metric_note="accuracy = leave-one-out 1-NN fault classification with the embeddings",
        )

    def dense_warnings(self, dense: BearingMeasures) -> list[str]:
        test = dense.test
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
