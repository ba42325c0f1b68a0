"""The causal-LM task's report: its figures (report.json "final" of a causal_lm job), its stage
metrics, and its parts of the pages: test perplexity overall and per domain, zero-shot choice
accuracy, greedy completions (pruned next to dense), the perplexity-per-stage picture, and the
comparison's language-modelling table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from runner.report.blocks import (
    Block,
    Em,
    Heading,
    Paragraph,
    Table,
    fmt_num,
    fmt_params,
    page_link,
)
from runner.report.model import (
    CompareRow,
    FinalFigures,
    Report,
    StageColumn,
    StageMetrics,
    StageRecord,
)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DomainPerplexity(_Part):
    """Test perplexity of one text domain (data.sources entry), pruned vs dense."""

    pruned: float
    dense: float | None
    tokens: int


class ChoiceAccuracy(_Part):
    """Zero-shot multiple choice as lm-evaluation-harness scores it (acc, length-normalised)."""

    acc: float
    acc_norm: float
    dense_acc: float | None
    dense_acc_norm: float | None
    n: int


class Generation(_Part):
    """Greedy completion of one fixed prompt by the dense and by the pruned model."""

    prompt: str
    dense: str | None
    pruned: str


class LanguageStageMetrics(StageMetrics):
    """After every stage, on the validation blocks (accuracy: next-token top-1 accuracy)."""

    perplexity: float | None = None
    perplexity_by_domain: dict[str, float] | None = None
    choice_acc_norm: dict[str, float] | None = None  # a sample of each choice task


_ROW_FIGURES = ("lm_perplexity", "dense_lm_perplexity", "perplexity_by_domain", "choice_accuracy")


class LanguageRowFigures(BaseModel):
    """A compare row's causal-LM figures (LanguageModelFigures.compare_figures)."""

    model_config = ConfigDict(extra="ignore")
    lm_perplexity: float | None = None
    dense_lm_perplexity: float | None = None
    perplexity_by_domain: dict[str, DomainPerplexity] | None = None
    choice_accuracy: dict[str, ChoiceAccuracy] | None = None


class LanguageModelFigures(FinalFigures):
    """A causal_lm job's final figures (`accuracy` is next-token top-1 accuracy on the test
    blocks); the dense side is None where a streamed run never measured the dense model."""

    lm_perplexity: float
    dense_lm_perplexity: float | None
    perplexity_by_domain: dict[str, DomainPerplexity] | None = None
    # the validation blocks the stage rows measure: the per-stage figure's dense line and end
    validation_perplexity_by_domain: dict[str, DomainPerplexity] | None = None
    choice_accuracy: dict[str, ChoiceAccuracy] | None = None
    generations: list[Generation] | None = None

    headline: ClassVar[str] = "Next-token test accuracy"
    stages_caption: ClassVar[str] = "perplexity per stage"

    def sections(self, report: Report) -> list[Block]:
        return language_model_section(self)

    def stage_columns(self, stages: list[StageRecord]) -> list[StageColumn]:
        metrics = [r.metrics(LanguageStageMetrics) for r in stages]
        if not any(m.perplexity is not None for m in metrics):
            return []
        cells = [fmt_num(m.perplexity, 2) for m in metrics]
        return [("perplexity", fmt_num(self.dense_lm_perplexity, 2), cells)]

    def pictures(self, report: Report) -> dict[str, Callable[[], bytes]]:
        def draw() -> bytes:
            # lazy: start-up cost (matplotlib); every command imports the tasks, few draw
            from runner.report.figures import perplexity_stages_plot, png_bytes

            return png_bytes(perplexity_stages_plot(report))

        return {"stages.png": draw}

    def compare_figures(self) -> dict:
        figures = self.model_dump(mode="json", include=set(_ROW_FIGURES))
        return {k: figures[k] for k in _ROW_FIGURES if figures.get(k) is not None}

    @classmethod
    def compare_note(cls, rows: list[CompareRow]) -> str:
        if any(_row_figures(r).lm_perplexity is not None for r in rows):
            return "; for a causal LM the accuracy is next-token top-1 accuracy."
        return ""

    @classmethod
    def compare_section(
        cls, out_dir: Path, rows: list[CompareRow], methods: list[str]
    ) -> list[Block]:
        return language_table(out_dir, rows, methods)


def language_model_section(f: LanguageModelFigures) -> list[Block]:
    blocks: list[Block] = [
        Heading("Language modelling"),
        Paragraph(
            "Test perplexity ",
            Em(f"{f.lm_perplexity:.2f}"),
            f" (dense {fmt_num(f.dense_lm_perplexity, 2)}); next-token accuracy "
            f"{fmt_num(f.accuracy)} (dense {fmt_num(f.dense_accuracy)}), on held-out test "
            "documents of data.sources.",
        ),
    ]
    if f.perplexity_by_domain:
        rows = tuple(
            (domain, fmt_num(p.dense, 2), f"{p.pruned:.2f}", f"{p.tokens:,}")
            for domain, p in f.perplexity_by_domain.items()
        )
        blocks.append(Table(("domain", "dense perplexity", "pruned perplexity", "tokens"), rows))
    if f.choice_accuracy:
        blocks.append(Heading("Zero-shot multiple choice", 3))
        rows = tuple(
            (name, str(c.n), fmt_num(c.dense_acc), fmt_num(c.acc), fmt_num(c.dense_acc_norm),
             fmt_num(c.acc_norm))
            for name, c in f.choice_accuracy.items()
        )  # fmt: skip
        headers = ("task", "items", "dense acc", "acc", "dense acc_norm", "acc_norm")
        blocks.append(Table(headers, rows))
    if f.generations:
        blocks.append(Heading("Greedy completions", 3))
        rows = tuple((g.prompt, g.dense or "-", g.pruned) for g in f.generations)
        blocks.append(Table(("prompt", "dense", "pruned"), rows))
    return blocks


# ----------------------------------------------------------------------------- comparison
def _row_figures(row: CompareRow) -> LanguageRowFigures:
    return LanguageRowFigures.model_validate(row.figures)


def language_table(out_dir: Path, rows: list[CompareRow], methods: list[str]) -> list[Block]:
    """Causal LM runs: test and per-domain perplexity, each choice task's acc / acc_norm."""
    done = [(r, _row_figures(r)) for r in rows if r.error is None]
    done = [(r, f) for r, f in done if f.lm_perplexity is not None]
    if not done:
        return []
    domains = list(dict.fromkeys(d for _, f in done for d in f.perplexity_by_domain or {}))
    tasks = list(dict.fromkeys(t for _, f in done for t in f.choice_accuracy or {}))
    headers = (
        "method", "target", "achieved", "params", "test ppl",
        *(f"ppl {d}" for d in domains), *(f"{t} acc / acc_norm" for t in tasks), "seconds",
    )  # fmt: skip
    first = done[0][1]
    dense = (
        "dense", "", "1.0x", "", fmt_num(first.dense_lm_perplexity, 2),
        *(_domain_cell(first, d, dense=True) for d in domains),
        *(_choice_cell(first, t, dense=True) for t in tasks), "",
    )  # fmt: skip
    order = {m: i for i, m in enumerate(methods)}
    table = [dense] + [
        (
            page_link(out_dir, r.dir, r.method),
            f"{r.ratio:g}x",
            f"{r.achieved_ratio:.2f}x",
            fmt_params(r.params),
            fmt_num(f.lm_perplexity, 2),
            *(_domain_cell(f, d) for d in domains),
            *(_choice_cell(f, t) for t in tasks),
            f"{r.seconds:.0f}",
        )  # fmt: skip
        for r, f in sorted(done, key=lambda x: (x[0].ratio, order.get(x[0].method, 0)))
    ]
    note = (
        "Language modelling: perplexity on held-out test blocks (lower is better), per text "
        "domain, and zero-shot multiple-choice accuracy (acc / length-normalised acc_norm)."
    )
    return [Paragraph(note), Table(headers, tuple(table))]


def _domain_cell(row: LanguageRowFigures, domain: str, dense: bool = False) -> str:
    p = (row.perplexity_by_domain or {}).get(domain)
    return "-" if p is None else fmt_num(p.dense if dense else p.pruned, 2)


def _choice_cell(row: LanguageRowFigures, task: str, dense: bool = False) -> str:
    c = (row.choice_accuracy or {}).get(task)
    if c is None:
        return "-"
    acc, norm = (c.dense_acc, c.dense_acc_norm) if dense else (c.acc, c.acc_norm)
    return f"{fmt_num(acc, 3)} / {fmt_num(norm, 3)}"
