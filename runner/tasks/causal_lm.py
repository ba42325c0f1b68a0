"""Causal language models in and out: real text, perplexity, zero-shot choice accuracy, generation.

The model loads as `AutoModelForCausalLM`; `data.sources` (runner/data/text_sources.py) become
packed blocks split by document; calibration draws from the domains by weight. The report compares
the exported model with the dense one on test perplexity (overall and per domain), zero-shot
multiple-choice accuracy (`evaluation.choice_tasks`, scored like lm-evaluation-harness) and greedy
completions of fixed prompts (`evaluation.prompts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from runner.data.bearing import DataConfig
from runner.data.choice_tasks import ChoiceTaskSpec, build_choice_tasks
from runner.data.text_sources import PackedBlocks, TextSource, build_text_splits
from runner.report.lm import LanguageModelFigures, LanguageStageMetrics
from runner.tasks.base import TaskData, register_task
from stages.choice_eval import evaluate_choice_tasks
from stages.metrics import EvalResult
from stages.objectives import get_objective
from stages.split import EncodedSplit

CHOICE_BATCH = 8

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Explain in one sentence what a ball bearing does.",
    "Write a Python function that returns the square of a number.",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TextData(_Section):
    """causal_lm's keys of the `data:` section (validation_fraction / test_fraction split the
    documents of these sources, calibration_size counts calibration blocks)."""

    sources: list[TextSource] = Field(
        default_factory=list,
        description="files, folders, globs or builtin:<corpus>, one domain each",
    )


class LanguageEvaluation(_Section):
    """causal_lm's keys of the `evaluation:` section."""

    choice_tasks: list[ChoiceTaskSpec] = Field(
        default_factory=list,
        description="zero-shot multiple choice (bearing_qa, cloze or a JSONL file)",
    )
    stage_choice_items: int = Field(
        50, ge=0, description="items per choice task measured after every stage"
    )
    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        description="prompts whose greedy completions the report shows",
    )
    max_new_tokens: int = Field(32, ge=1, le=1024)
    test_blocks: int | None = Field(
        64, ge=1, description="test blocks per domain for perplexity (None: all)"
    )
    validation_blocks: int | None = Field(
        16, ge=1, description="validation blocks per domain measured after each stage"
    )


class CausalLMOptions(_Section):
    """causal_lm's part of the job file, by the section each key sits in."""

    data: TextData = Field(default_factory=TextData)
    evaluation: LanguageEvaluation = Field(default_factory=LanguageEvaluation)


def job_choice_tasks(cfg) -> list[ChoiceTaskSpec]:
    """A job's evaluation.choice_tasks; none for a job of another task (it has no such key)."""
    return list(getattr(cfg.evaluation, "choice_tasks", []))


def job_text_sources(cfg) -> list[TextSource]:
    """A job's data.sources; none for a job of another task (it has no such key)."""
    return list(getattr(cfg.data, "sources", []))


def encoded(blocks: PackedBlocks) -> EncodedSplit:
    """Packed blocks as an EncodedSplit; a row's label is its domain index (reports split by it)."""
    return EncodedSplit(blocks.input_ids, blocks.attention_mask, blocks.domain_ids.clone())


def per_domain(blocks: PackedBlocks, limit: int | None) -> PackedBlocks:
    """At most `limit` blocks of every domain (its first ones: documents were split at random).

    Evaluation runs a forward pass per block: on 2 CPU cores SmolLM2 reads ~1,000 tokens/s, so
    an uncapped 20% of the stdlib corpus (43k tokens) would cost minutes per measurement."""
    if limit is None:
        return blocks
    keep = []
    for index in range(len(blocks.domains)):
        rows = torch.nonzero(blocks.domain_ids == index).flatten()[:limit]
        keep.append(rows)
    return blocks.select(torch.cat(keep)) if keep else blocks


def bearing_data(cfg) -> DataConfig:
    """The bearing settings of the job's data section (for the built-in bearing corpora)."""
    return DataConfig.model_validate(
        {k: v for k, v in cfg.data.model_dump().items() if k in DataConfig.model_fields}
    )


def text_splits(cfg, model_cfg, tokenizer):
    """The job's text by document (train / validation / test / calibration): the same split on
    every run of the job, so `cascade eval` rebuilds the cloze items the job's report scored."""
    return build_text_splits(
        cfg.data.sources, tokenizer, model_cfg.max_length, seed=cfg.data.seed,
        validation_fraction=cfg.data.validation_fraction,
        test_fraction=cfg.data.test_fraction, calibration_blocks=cfg.data.calibration_size,
        calibration_batch_size=cfg.calibration.batch_size, data_cfg_for_bearing=bearing_data(cfg),
    )  # fmt: skip


def chat_prompt(tokenizer, prompt: str) -> list[int]:
    """An instruct model's chat form of `prompt` when its tokenizer has a template, else raw."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt (KV cache on), decoded without special tokens."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        texts = []
        for prompt in prompts:
            ids = torch.tensor([chat_prompt(tokenizer, prompt)], device=device)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=max_new_tokens, pad_token_id=pad,
            )  # fmt: skip
            texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return texts
    finally:
        model.train(was_training)


@dataclass
class LanguageMeasures:
    """What the final report compares (Task.measure), dense and exported."""

    test: EvalResult
    prompts: list[str]
    by_domain: dict[str, EvalResult]
    validation_by_domain: dict[str, EvalResult]
    choices: dict[str, dict]
    generations: list[str]
    validation_documents: dict[str, int] = field(default_factory=dict)  # per domain


# Fewer validation documents than this in a domain: its validation perplexity is one or two
# documents' text. On SmolLM2 the job's 2 validation documents came back to 0.92x dense while its
# held-out test documents stayed at 1.37x (benchmarks/per_document.py, docs/RESULTS.md).
MIN_VALIDATION_DOCUMENTS = 3


@register_task
class CausalLMTask:
    name: ClassVar[str] = "causal_lm"
    head: ClassVar[str] = "causal_lm"
    objective = get_objective("causal_lm")
    options = CausalLMOptions
    figures = LanguageModelFigures

    def config_problems(self, cfg, stage_names: list[str]) -> list[str]:
        problems = []
        if not cfg.data.sources:
            problems.append(
                "data.sources: a causal_lm job needs text; list local files or built-in corpora "
                "(builtin:stdlib_docs, builtin:bearing_notes, builtin:bearing_qa)"
            )
        problems += [
            f"models.{i}.finetune_steps: fine-tuning trains a classification head; a causal LM "
            "keeps its own"
            for i, m in enumerate(cfg.models)
            if m.finetune_steps
        ]
        if cfg.evaluation.perplexity_file is not None:
            problems.append(
                "evaluation.perplexity_file: a causal_lm job measures perplexity on the test "
                "documents of data.sources; add the file there as a source with its own domain"
            )
        return problems

    def load_kwargs(self, cfg) -> dict:
        return {}

    def build_data(self, cfg, model_cfg, model, tokenizer) -> TaskData:
        bearing = bearing_data(cfg)
        text = text_splits(cfg, model_cfg, tokenizer)
        evaluation = cfg.evaluation
        splits = {name: encoded(getattr(text, name)) for name in ("train", "calibration")}
        validation = per_domain(text.validation, evaluation.validation_blocks)
        splits["validation"] = encoded(validation)
        splits["test"] = encoded(per_domain(text.test, evaluation.test_blocks))
        choices = build_choice_tasks(
            evaluation.choice_tasks, tokenizer, test_documents=text.test_documents,
            data_cfg=bearing, seed=cfg.seed,
        )  # fmt: skip
        extras = {
            "by_domain": {
                d: encoded(per_domain(b, evaluation.test_blocks))
                for d, b in text.test_by_domain.items()
                if len(b)
            },
            "validation_by_domain": {
                d: encoded(validation.of_domain(d))
                for d in validation.domains
                if len(validation.of_domain(d))
            },
            "choices": choices,
            # none when stage_choice_items is 0: an empty sample would score NaN after each stage
            "stage_choices": {
                k: v[: evaluation.stage_choice_items]
                for k, v in choices.items()
                if evaluation.stage_choice_items and v
            },
            "prompts": list(evaluation.prompts),
            "max_new_tokens": evaluation.max_new_tokens,
            "tokenizer": tokenizer,
            "text_stats": text.stats,
        }
        return TaskData(splits, extras)

    def prepare_dense(self, cfg, model_cfg, model, data: TaskData, log) -> dict | None:
        return None

    def evaluate(self, model, data: TaskData, split: str):
        return self.objective.evaluate(model, data.splits[split])

    def stage_metrics(self, model, data: TaskData) -> LanguageStageMetrics:
        parts = self._by_domain(model, data.extras["validation_by_domain"])
        val = pooled(parts.values())  # the validation split is the domains' blocks together
        metrics = LanguageStageMetrics(
            accuracy=val.accuracy,
            perplexity=val.perplexity,
            perplexity_by_domain={d: r.perplexity for d, r in parts.items()},
        )
        if data.extras["stage_choices"]:
            scores = _choices(model, data.extras["stage_choices"], data)
            metrics.choice_acc_norm = {k: v["acc_norm"] for k, v in scores.items()}
        return metrics

    def measure(self, model, data: TaskData) -> LanguageMeasures:
        extras = data.extras
        return LanguageMeasures(
            test=self.evaluate(model, data, "test"),
            prompts=extras["prompts"],
            by_domain=self._by_domain(model, extras["by_domain"]),
            # the reference the per-stage figure draws the stages' validation perplexity against
            validation_by_domain=self._by_domain(model, extras["validation_by_domain"]),
            choices=_choices(model, extras["choices"], data),
            generations=greedy_completions(
                model, extras["tokenizer"], extras["prompts"], extras["max_new_tokens"]
            ),
            validation_documents={
                d: s["documents"]["validation"] for d, s in extras["text_stats"].items()
            },
        )

    def _by_domain(self, model, splits: dict) -> dict:
        return {d: self.objective.evaluate(model, split) for d, split in splits.items()}

    def headline(self, measures: LanguageMeasures) -> float:
        return measures.test.accuracy

    def final_figures(self, final, dense, shared: dict) -> LanguageModelFigures:
        def domains(pruned: dict, reference: dict | None) -> dict:
            return {
                d: {
                    "pruned": result.perplexity,
                    "dense": reference[d].perplexity if reference else None,
                    "tokens": result.tokens,
                }
                for d, result in pruned.items()
            }

        def dense_choice(name: str, key: str) -> float | None:
            return dense.choices[name][key] if dense else None

        return LanguageModelFigures(
            **shared,
            accuracy=final.test.accuracy,
            dense_accuracy=dense.test.accuracy if dense else None,
            lm_perplexity=final.test.perplexity,
            dense_lm_perplexity=dense.test.perplexity if dense else None,
            perplexity_by_domain=domains(final.by_domain, dense and dense.by_domain),
            validation_perplexity_by_domain=domains(
                final.validation_by_domain, dense and dense.validation_by_domain
            ),
            choice_accuracy={
                name: {
                    "acc": score["acc"],
                    "acc_norm": score["acc_norm"],
                    "dense_acc": dense_choice(name, "acc"),
                    "dense_acc_norm": dense_choice(name, "acc_norm"),
                    "n": score["n"],
                }
                for name, score in final.choices.items()
            },
            generations=[
                {"prompt": p, "dense": d, "pruned": g}
                for p, d, g in zip(
                    final.prompts,
                    dense.generations if dense else [None] * len(final.generations),
                    final.generations,
                )
            ],
        )

    def dense_warnings(self, dense: LanguageMeasures) -> list[str]:
        """Domains whose validation split is too few documents to choose settings on."""
        return [
            f"data: the validation split holds {n} document(s) of domain {domain!r}: its "
            "perplexity (what stage figures and settings are judged on) is those documents' "
            "text and can differ far from held-out text; raise data.validation_fraction or add "
            "documents"
            for domain, n in dense.validation_documents.items()
            if 0 < n < MIN_VALIDATION_DOCUMENTS
        ]


def pooled(results) -> EvalResult:
    """One split's figures from its disjoint parts (token-weighted: the same numbers one pass
    over all of them gives, to float rounding)."""
    results = list(results)
    tokens = sum(r.tokens for r in results)
    loss = sum(r.loss * r.tokens for r in results) / max(tokens, 1)
    return EvalResult(
        accuracy=sum(r.accuracy * r.tokens for r in results) / max(tokens, 1),
        macro_f1=None,
        loss=loss,
        confusion=None,
        n=sum(r.n for r in results),
        perplexity=math.exp(min(loss, 700.0)),
        tokens=tokens,
    )


def _choices(model, tasks: dict, data: TaskData) -> dict:
    tokenizer = data.extras["tokenizer"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return evaluate_choice_tasks(model, tasks, batch_size=CHOICE_BATCH, pad_id=pad)
