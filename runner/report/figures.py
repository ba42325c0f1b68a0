"""Pictures for the report pages, drawn as PNG bytes: one job's stages and confusion matrix, a
comparison's accuracy-vs-compression curves, a family's size / SIA / device-fit plots.

Drawn with matplotlib's object API (`Figure`, no pyplot): no global backend or figure registry, so
drawing is safe in any process (Ray tasks, threads) and nothing has to be closed. The layer picture
lives with the layer counts in runner/report/layout.py.
"""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
)

from runner.data.bearing import CLASS_NAMES
from runner.report.blocks import fmt_params
from runner.report.lm import LanguageModelFigures, LanguageStageMetrics
from runner.report.model import CompareResult, FamilyRow, Report


def png_bytes(fig: Figure, dpi: int = 90) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ----------------------------------------------------------------------------- one job
def stages_figure(report: Report) -> bytes:
    """Accuracy and parameters per stage (a task may draw its own: FinalFigures.pictures)."""
    f, stages = report.final, report.stages
    names = ["dense"] + [r.name for r in stages] + ["final (export)"]
    acc = [f.dense_accuracy] + [r.accuracy for r in stages] + [f.accuracy]
    acc = [float("nan") if a is None else a for a in acc]  # not measured (streamed): a gap
    params = [f.dense_params] + [r.params_after for r in stages] + [f.params]
    fig = Figure(figsize=(9, 3.8))
    ax = fig.subplots()
    ax2 = ax.twinx()
    ax2.bar(names, params, alpha=0.25, color="tab:orange")
    ax2.set_ylabel("parameters")
    ax.plot(names, acc, "o-", color="tab:blue", zorder=3)
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy (stages: validation; dense/final: test)")
    ax.tick_params(axis="x", rotation=25)
    ax.set_title("accuracy (line) and parameters (bars) per stage")
    return png_bytes(fig)


def _pooled_ppl(parts: list[tuple[float, int]]) -> float:
    """Perplexity of several domains' tokens together, from each one's (perplexity, tokens)."""
    tokens = sum(n for _, n in parts)
    return math.exp(sum(math.log(p) * n for p, n in parts) / tokens)


def _perplexity_panels(report: Report) -> list[tuple[str, list[float | None], float | None, str]]:
    """(title, [stage values..., final], dense reference, what the reference is) per panel: one
    per domain, plus all domains together when there are several. Everything on the validation
    blocks the stage rows measure; a report without per-domain stage figures (written before
    they existed) gets one panel and the dense TEST perplexity as its reference, labelled so."""
    f = report.final
    assert isinstance(f, LanguageModelFigures), "perplexity per stage: a causal_lm report"
    stages = [r.metrics(LanguageStageMetrics) for r in report.stages]
    ref = f.validation_perplexity_by_domain or {}
    if not ref or not any(r.perplexity_by_domain for r in stages):
        values = [r.perplexity for r in stages] + [f.lm_perplexity]
        return [("all text (final: test split)", values, f.dense_lm_perplexity, "dense, test")]
    panels = [
        (d, [(r.perplexity_by_domain or {}).get(d) for r in stages] + [p.pruned], p.dense, "dense")
        for d, p in ref.items()
    ]
    if len(ref) > 1:
        dense = None
        if all(p.dense is not None for p in ref.values()):
            dense = _pooled_ppl([(p.dense, p.tokens) for p in ref.values()])
        final = _pooled_ppl([(p.pruned, p.tokens) for p in ref.values()])
        panels.append(("all domains", [r.perplexity for r in stages] + [final], dense, "dense"))
    return panels


def _log_axis(ax, values: list[float | None]) -> None:
    """Log scale with readable ticks: within one decade (most stages) a few round values, as
    log ticks alone would label none between 100 and 200; plain numbers, not 1.5 x 10^2."""
    ax.set_yscale("log")
    seen = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if seen and max(seen) / min(seen) < 10:
        ticks = MaxNLocator(nbins=5).tick_values(min(seen), max(seen))
        ax.yaxis.set_major_locator(FixedLocator([t for t in ticks if t > 0]))
        ax.yaxis.set_minor_locator(NullLocator())
    for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        set_formatter(FuncFormatter(lambda v, _pos: f"{v:.4g}"))


def perplexity_stages_plot(report: Report) -> Figure:
    """Validation perplexity after every stage, log scale, one panel per domain, the dense model
    as a dashed reference line; x labels carry each stage's parameter count."""
    stages, f = report.stages, report.final
    labels = [f"{r.name} ({fmt_params(r.params_after)})" for r in stages]
    labels.append(f"final export ({fmt_params(f.params)})")
    panels = _perplexity_panels(report)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(max(6.0, 4.2 * columns), 3.6 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, (title, values, dense, what) in zip(axes, panels):
        ys = [float("nan") if v is None else v for v in values]  # not measured (streamed): a gap
        ax.plot(range(len(ys)), ys, "o-", color="tab:blue", zorder=3, label="pruned")
        if dense is not None:
            ax.axhline(dense, color="0.3", ls="--", label=f"{what} {dense:.2f}")
        _log_axis(ax, [*ys, dense])
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("validation perplexity per stage (lower is better)", fontsize=11)
    return fig


def confusion_figure(confusion: list[list[int]]) -> bytes:
    size = len(confusion)
    names = list(CLASS_NAMES) if size == len(CLASS_NAMES) else [str(i) for i in range(size)]
    fig = Figure(figsize=(5.5, 4.8))
    ax = fig.subplots()
    ax.imshow(confusion, cmap="Blues")
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(size), names, rotation=60, fontsize=7)
    ax.set_yticks(range(size), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test split, exported checkpoint)")
    return png_bytes(fig)


# ----------------------------------------------------------------------------- comparison
def compare_figure(result: CompareResult) -> bytes:
    """Test accuracy against achieved compression, one panel per model, one line per method."""
    models = list(dict.fromkeys(r.model for r in result.rows))
    fig = Figure(figsize=(6 * max(1, len(models)), 4))
    axes = fig.subplots(1, max(1, len(models)), squeeze=False)[0]
    for ax, model in zip(axes, models):
        for method in result.methods:
            pts = sorted(
                (r.achieved_ratio, r.accuracy)
                for r in result.rows
                if r.model == model and r.method == method and r.error is None
                if r.achieved_ratio is not None and r.accuracy is not None
            )
            if pts:
                ax.plot(*zip(*pts), "o-", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("compression (dense / pruned params)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(model)
        ax.grid(alpha=0.3)
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=7, loc="lower left")
    return png_bytes(fig, dpi=100)


# ----------------------------------------------------------------------------- family
def _human(v, _pos) -> str:
    return f"{v / 1e6:.3g}M" if v >= 1e5 else f"{v / 1e3:.3g}k"


def family_figures(rows: list[FamilyRow]) -> list[tuple[str, bytes]]:
    """(file name, PNG): size.png (accuracy and params vs dense size), sia.png when SIA was
    measured, device.png when the models were validated on a device."""
    ok = sorted((r for r in rows if r.accuracy is not None), key=lambda r: r.dense_params or 0)
    drawn = []
    if ok:
        drawn.append(("size.png", _size_figure(ok)))
    sia = [r for r in ok if r.sia_score is not None]
    if sia:
        fig = Figure(figsize=(8, 3.5))
        ax = fig.subplots()
        colors = ["tab:green" if r.sia_satisfied else "tab:red" for r in sia]
        ax.bar([r.model for r in sia], [r.sia_score for r in sia], color=colors)
        ax.axhline(sia[0].sia_threshold, color="k", ls="--", label="threshold")
        ax.set(ylabel="SIA score (lower: more independent)", title="SIA score per model")
        ax.tick_params(axis="x", rotation=25)
        ax.legend()
        drawn.append(("sia.png", png_bytes(fig)))
    dev = [r for r in ok if r.fits is not None]
    if dev:
        fig = Figure(figsize=(8, 3.5))
        ax = fig.subplots()
        colors = ["tab:green" if r.fits else "tab:red" for r in dev]
        peaks = [r.peak_bytes / 2**30 for r in dev]
        ax.bar([r.model for r in dev], peaks, color=colors, label="peak")
        budgets = [r.budget_bytes / 2**30 for r in dev]
        xs = range(len(dev))
        ax.hlines(
            budgets, [x - 0.45 for x in xs], [x + 0.45 for x in xs], "k", "--", label="budget"
        )
        ax.set(ylabel="GiB", title=f"fits on {dev[0].device}? (green: yes)")
        ax.tick_params(axis="x", rotation=25)
        ax.legend()
        drawn.append(("device.png", png_bytes(fig)))
    return drawn


def _size_figure(ok: list[FamilyRow]) -> bytes:
    human = FuncFormatter(_human)
    fig = Figure(figsize=(11, 4))
    ax, ax2 = fig.subplots(1, 2)
    for arch in dict.fromkeys(r.architecture for r in ok):
        pts = [r for r in ok if r.architecture == arch]
        x = [r.dense_params for r in pts]
        name = (arch or "?").removesuffix("ForSequenceClassification")
        label = f"{name} ({pts[0].attention}/{pts[0].mlp})"
        line = ax.plot(x, [r.accuracy for r in pts], "o-", label=f"{label} pruned")[0]
        color = line.get_color()
        dense = [r.dense_accuracy for r in pts]
        ax.plot(x, dense, "s--", color=color, alpha=0.5, label=f"{label} dense")
        ax2.plot(x, [r.params for r in pts], "o-", color=color, label=f"{label} pruned")
        ax2.plot(x, x, "s--", color=color, alpha=0.5, label=f"{label} dense")
        for r in pts:
            xy = (r.dense_params, r.accuracy)
            ax.annotate(r.model, xy, fontsize=6, xytext=(3, 3), textcoords="offset points")
    lowest = min(min(r.accuracy, r.dense_accuracy) for r in ok)
    ax.set(
        ylim=(max(0.0, lowest - 0.1), 1.02),
        xlabel="dense parameters",
        ylabel="test accuracy",
        title="accuracy vs model size",
    )
    ax2.set(ylim=(0, None), xlabel="dense parameters", ylabel="parameters")
    ax2.set_title("parameters vs model size")
    for a in (ax, ax2):
        a.set_xscale("log")
        a.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        a.xaxis.set_major_formatter(human)
        a.xaxis.set_minor_formatter(NullFormatter())
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
    ax2.yaxis.set_major_formatter(human)
    return png_bytes(fig)
