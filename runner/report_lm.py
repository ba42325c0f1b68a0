"""Sections of a job report about what the pruned model is for: the causal-LM figures
(perplexity overall and per domain, zero-shot choice accuracy, greedy completions, pruned next to
dense; empty for other tasks) and which serving engines load the export."""

from __future__ import annotations

from runner.report_blocks import Block, Em, Heading, Paragraph, Table, fmt_num
from runner.report_model import Report


def deployment_section(report: Report) -> list[Block]:
    """Which engines load the exported checkpoint (runner/engines.py)."""
    engines = report.final.engines
    if not engines:
        return []
    rows = tuple((engine, verdict) for engine, verdict in engines.items())
    return [Heading("Deployment"), Table(("engine", "loads the export?"), rows)]


def language_model_section(report: Report) -> list[Block]:
    f = report.final
    if f.lm_perplexity is None:
        return []
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
