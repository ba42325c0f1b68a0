"""One model's job report: report.json, and report.md + report.html rendered from the same sections.

Each section below reads the typed `Report` and returns blocks (runner/report/blocks.py); `job_page`
lists them in reading order. write_report writes report.md and write_job_html writes report.html
from that one list, so the two pages cannot drift. The pictures are drawn once, into plots/:
report.md links those files and report.html embeds the same bytes.
A multi-model job also gets summary.json / summary.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from runner.report.blocks import (
    Block,
    Em,
    Heading,
    Image,
    Paragraph,
    Table,
    fmt_num,
    fmt_params,
    page_link,
    write_html,
    write_markdown,
)
from runner.report.figures import stages_figure
from runner.report.layout import layer_breakdown, layout_figure
from runner.report.model import (
    DenseFinetune,
    DeviceFit,
    Perplexity,
    Report,
    every_task_figures,
)
from stages.atomic import write_json_atomic


def write_report(out: str | Path, report: Report, *, plots: bool = True) -> None:
    """OUT/report.json (exactly `report.to_json()`) and OUT/report.md; with plots, the pictures
    are drawn into OUT/plots/ first (without, any old ones go: no page may show a stale one)."""
    out = Path(out)
    write_json_atomic(out / "report.json", report.to_json())
    breakdown = job_breakdown(out)
    if plots:
        write_job_figures(out, report, breakdown)
    else:
        task_pictures = [name for f in every_task_figures() for name in f.picture_files]
        for name in dict.fromkeys([*_PICTURES, *task_pictures]):
            (out / "plots" / name).unlink(missing_ok=True)
    write_markdown(out / "report.md", job_page(report, breakdown, figures=plots))


def write_job_html(out: str | Path, report: Report | None = None) -> Path:
    """OUT/report.html, embedding the pictures of OUT/plots/ (drawn now where missing: a job run
    with plots off, or by an older version); `report` defaults to OUT/report.json."""
    out = Path(out)
    report = report if report is not None else Report.read(out / "report.json")
    breakdown = job_breakdown(out)
    write_job_figures(out, report, breakdown, only_missing=True)
    return write_html(out / "report.html", job_page(report, breakdown))


def job_page(report: Report, breakdown: dict | None, *, figures: bool = True) -> list[Block]:
    """Every section of the job page, in reading order. `breakdown`: job_breakdown(job dir);
    with `figures`, the pictures of plots/ (write_job_figures) are shown. The task's figures
    (report.final) add its own sections."""
    return [
        *summary_section(report),
        *warnings_section(report),
        *finetune_section(report),
        *report.final.sections(report),
        *perplexity_section(report),
        *sia_section(report),
        *stages_section(report, figures),
        *layers_section(breakdown, figures),
        *report.final.picture_sections(figures),
        *device_section(report),
        *deployment_section(report),
        *timing_section(report),
    ]


# ----------------------------------------------------------------------------- pictures
_PICTURES = ("stages.png", "layout.png")  # + each task's own (FinalFigures.picture_files)


def job_breakdown(job_dir: Path) -> dict | None:
    """runner.report.layout.layer_breakdown of the exported checkpoint; None when unknown."""
    try:
        return layer_breakdown(job_dir)
    except Exception:  # noqa: BLE001 - an unknown layout must not cost the rest of the report
        return None


def _drawers(report: Report, breakdown: dict | None) -> dict[str, Callable[[], bytes]]:
    """The pictures this report has, by file name under plots/ (the task's may replace one)."""
    drawers = {"stages.png": lambda: stages_figure(report)}
    if breakdown:
        drawers["layout.png"] = lambda: layout_figure(report, breakdown)
    return drawers | report.final.pictures(report)


def write_job_figures(
    out: Path, report: Report, breakdown: dict | None, *, only_missing: bool = False
) -> None:
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for name, draw in _drawers(report, breakdown).items():
        path = out / "plots" / name
        if not (only_missing and path.is_file()):
            path.write_bytes(draw())


# ----------------------------------------------------------------------------- sections
def summary_section(report: Report) -> list[Block]:
    m, f = report.model, report.final
    return [
        Heading(f"Compression report: {m.name}", 1),
        Paragraph(
            f"Architecture {m.architecture} ({m.attention} attention, {m.mlp} MLP), "
            f"{fmt_params(f.dense_params)} -> {fmt_params(f.params)} parameters (",
            Em(f"{f.compression_ratio:.2f}x"),
            ").",
        ),
        Paragraph(
            f"{f.headline} ",
            Em(fmt_num(f.accuracy)),
            f" (dense {fmt_num(f.dense_accuracy)})"
            + "".join(f", {p}" for p in f.summary_figures())
            + ". Final figures are measured on the exported checkpoint reloaded from disk.",
        ),
    ]


def warnings_section(report: Report) -> list[Block]:
    return [Paragraph(Em("WARNING:"), f" {w}.", tone="bad") for w in report.warnings]


def finetune_sentence(tune: DenseFinetune) -> str:
    """How the dense model got its task head (fine-tuned by the job before pruning)."""
    return (
        f"The dense model was fine-tuned first: {tune.steps} steps at lr {tune.lr:g}, "
        f"training loss {tune.first_loss:.3f} -> {tune.last_loss:.3f}"
        + (" (weights loaded from the fine-tune cache)." if tune.cached else ".")
    )


def finetune_section(report: Report) -> list[Block]:
    tune = report.final.dense_finetune
    return [Paragraph(finetune_sentence(DenseFinetune.model_validate(tune)))] if tune else []


def perplexity_section(report: Report) -> list[Block]:
    """evaluation.perplexity_file: perplexity through the source checkpoint's LM head."""
    f = report.final
    if not f.perplexity:
        return []
    p = Perplexity.model_validate(f.perplexity)
    windows = f", windows of {p.window}" if p.window else ""
    return [
        Paragraph(
            f"Perplexity on {p.file} ({p.tokens:,} tokens{windows}): ",
            Em(f"{p.perplexity:.2f}"),
            f" (dense {fmt_num(p.dense, 2)}), through the source checkpoint's LM head.",
        )
    ]


def sia_section(report: Report) -> list[Block]:
    sia = report.sia
    heading = Heading("Structural Independence Assumption")
    if not sia.model_dump(exclude_none=True):  # {} when the check was disabled
        return [heading, Paragraph("SIA check not run.")]
    per = ", ".join(f"{k}: {v:.3f}" for k, v in (sia.per_granularity or {}).items())
    verdict = Em("satisfied", "ok") if sia.satisfied else Em("VIOLATED", "bad")
    policy = f", policy {sia.policy}" if sia.policy else ""
    text = f": score {fmt_num(sia.score, 3)} (threshold {sia.threshold}{policy})."
    return [heading, Paragraph(verdict, text + (f" {per}" if per else ""))]


def stages_section(report: Report, figures: bool) -> list[Block]:
    """The stage table (dense row first; the task's columns after accuracy) and, with figures,
    the task's figure per stage (accuracy and size, or perplexity)."""
    f, stages = report.final, report.stages
    columns = f.stage_columns(stages)
    headers = ("#", "stage", "kind", "criterion", "version", "params before", "params after")
    headers += ("accuracy", *(header for header, _, _ in columns), "seconds")
    dense_params = fmt_params(f.dense_params)
    dense = ("-", "dense", "-", "-", "0", dense_params, dense_params, fmt_num(f.dense_accuracy))
    rows = [(*dense, *(cell for _, cell, _ in columns), "-")]
    for i, r in enumerate(stages):
        row = (str(r.index), r.name, r.kind, r.criterion or "-", str(r.version))
        row += (fmt_params(r.params_before), fmt_params(r.params_after), fmt_num(r.accuracy))
        rows.append((*row, *(cells[i] for _, _, cells in columns), f"{r.seconds:.1f}"))
    blocks: list[Block] = [
        Heading("Stages"),
        Paragraph("Stage rows: validation split; the dense row: test split."),
        Table(headers, tuple(rows)),
    ]
    if figures:
        blocks.append(Image(f.stages_caption, "plots/stages.png"))
    return blocks


def _totals(counts: dict) -> list[int]:
    layers = counts["layers"]
    parts = [sum(x[k] for x in layers) for k in ("attention", "mlp", "norm")]
    return [counts["embeddings"], *parts, counts["other"]]


def layers_section(bd: dict | None, figures: bool) -> list[Block]:
    """Parameters per part, dense and pruned, from the exported checkpoint's layout."""
    if not bd:
        return []
    labels = ["embeddings", "attention", "MLP", "layer norms", "head / final norm"]
    dense = _totals(bd["dense"]) if bd["dense"] else [None] * len(labels)
    pruned = _totals(bd["pruned"])
    rows = tuple((lab, fmt_params(d), fmt_params(p)) for lab, d, p in zip(labels, dense, pruned))
    blocks: list[Block] = [
        Heading("Parameters per layer"),
        Table(("part", "dense", "pruned"), rows),
    ]
    if figures:
        blocks.append(Image("pruned layout", "plots/layout.png"))
    return blocks


def device_section(report: Report) -> list[Block]:
    if not report.validation:
        return []
    v = DeviceFit.model_validate(report.validation)
    dense = f" (dense {v.dense_peak_bytes / 2**30:.3f} GiB)" if v.dense_peak_bytes else ""
    blocks: list[Block] = [
        Heading("Device fit"),
        Paragraph(
            f"{v.device}: budget {v.budget_bytes / 2**30:.2f} GiB, "
            f"peak {v.peak_bytes / 2**30:.3f} GiB{dense}: ",
            Em("fits", "ok") if v.fits else Em("DOES NOT FIT", "bad"),
            ".",
        ),
    ]
    lat = v.latency_ms or {}
    if any(x is not None for x in lat.values()):
        dense_ms, pruned_ms = fmt_num(lat.get("dense"), 2), fmt_num(lat.get("pruned"), 2)
        blocks.append(Paragraph(f"Latency: dense {dense_ms} ms, pruned {pruned_ms} ms."))
    return blocks


def deployment_section(report: Report) -> list[Block]:
    """Which engines load the exported checkpoint (runner/engines.py)."""
    engines = report.final.engines
    if not engines:
        return []
    rows = tuple((engine, verdict) for engine, verdict in engines.items())
    return [Heading("Deployment"), Table(("engine", "loads the export?"), rows)]


def timing_section(report: Report) -> list[Block]:
    return [Paragraph(f"Total time {report.timing.total_seconds:.1f} s.")]


# ----------------------------------------------------------------------------- several models
def write_summary(out: str | Path, reports: dict[str, Report]) -> None:
    """OUT/summary.json and OUT/summary.md: one line per model of a multi-model job."""
    out = Path(out)
    rows = {
        name: {
            "compression_ratio": r.final.compression_ratio,
            "accuracy": r.final.accuracy,
            "dense_accuracy": r.final.dense_accuracy,
            "params": r.final.params,
            "sia_satisfied": r.sia.satisfied,
        }
        for name, r in reports.items()
    }
    write_json_atomic(out / "summary.json", rows)
    headers = ("model", "params", "compression", "accuracy", "dense accuracy", "SIA")
    table = tuple(
        (
            page_link(out, out / name, name),
            fmt_params(r.final.params),
            f"{r.final.compression_ratio:.2f}x",
            fmt_num(r.final.accuracy),
            fmt_num(r.final.dense_accuracy),
            str(r.sia.satisfied),
        )
        for name, r in reports.items()
    )
    write_markdown(out / "summary.md", [Heading("Job summary", 1), Table(headers, table)])
