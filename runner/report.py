"""One model's job report: report.json, and report.md + report.html rendered from the same sections.

Each section below reads the typed `Report` and returns blocks (runner/report_blocks.py); `job_page`
lists them in reading order. write_report writes report.md and write_job_html writes report.html
from that one list, so the two pages cannot drift. The pictures are drawn once, into plots/:
report.md links those files and report.html embeds the same bytes.
A multi-model job also gets summary.json / summary.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from runner.report_blocks import (
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
from runner.report_figures import confusion_figure, stages_figure
from runner.report_layout import layer_breakdown, layout_figure
from runner.report_lm import deployment_section, language_model_section
from runner.report_model import DenseFinetune, DeviceFit, Perplexity, Report
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
        for name in _PICTURES:
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
    with `figures`, the pictures of plots/ (write_job_figures) are shown."""
    return [
        *summary_section(report),
        *warnings_section(report),
        *finetune_section(report),
        *task_figures_section(report),
        *language_model_section(report),
        *sia_section(report),
        *stages_section(report, figures),
        *layers_section(breakdown, figures),
        *confusion_section(report, figures),
        *device_section(report),
        *deployment_section(report),
        *timing_section(report),
    ]


# ----------------------------------------------------------------------------- pictures
_PICTURES = ("stages.png", "layout.png", "confusion.png")


def job_breakdown(job_dir: Path) -> dict | None:
    """runner.report_layout.layer_breakdown of the exported checkpoint; None when unknown."""
    try:
        return layer_breakdown(job_dir)
    except Exception:  # noqa: BLE001 - an unknown layout must not cost the rest of the report
        return None


def _drawers(report: Report, breakdown: dict | None) -> dict[str, Callable[[], bytes]]:
    """The pictures this report has, by file name under plots/."""
    drawers = {"stages.png": lambda: stages_figure(report)}
    if breakdown:
        drawers["layout.png"] = lambda: layout_figure(report, breakdown)
    if report.final.confusion:
        drawers["confusion.png"] = lambda: confusion_figure(report.final.confusion)
    return drawers


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
            "Next-token test accuracy " if f.lm_perplexity is not None else "Test accuracy ",
            Em(fmt_num(f.accuracy)),
            f" (dense {fmt_num(f.dense_accuracy)}){_optional_figures(report)}. "
            "Final figures are measured on the exported checkpoint reloaded from disk.",
        ),
    ]


def _optional_figures(report: Report) -> str:
    """Macro-F1 and held-out accuracy, for the tasks that measure them."""
    f, parts = report.final, []
    if f.macro_f1 is not None:
        parts.append(f"macro-F1 {fmt_num(f.macro_f1)}")
    if f.heldout_accuracy is not None:
        dense = fmt_num(f.dense_heldout_accuracy)
        parts.append(f"held-out load accuracy {fmt_num(f.heldout_accuracy)} (dense {dense})")
    return "".join(f", {p}" for p in parts)


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


def task_figures_section(report: Report) -> list[Block]:
    """Figures only some tasks produce: embedding agreement, perplexity through an LM head."""
    f, blocks = report.final, []
    if f.cosine is not None:
        blocks.append(
            Paragraph(
                "Embedding model: mean cosine similarity to the dense embeddings ",
                Em(fmt_num(f.cosine)),
                f" on test sentences, {fmt_num(f.heldout_cosine)} on held-out-load sentences "
                "(never distilled on). Accuracy above is leave-one-out 1-NN fault classification "
                "with the embeddings.",
            )
        )
    if f.perplexity:
        p = Perplexity.model_validate(f.perplexity)
        windows = f", windows of {p.window}" if p.window else ""
        blocks.append(
            Paragraph(
                f"Perplexity on {p.file} ({p.tokens:,} tokens{windows}): ",
                Em(f"{p.perplexity:.2f}"),
                f" (dense {fmt_num(p.dense, 2)}), through the source checkpoint's LM head.",
            )
        )
    return blocks


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
    """The stage table (dense row first) and, with figures, accuracy and size per stage."""
    f, stages = report.final, report.stages
    cosine = any(r.cosine is not None for r in stages)
    ppl = any(r.perplexity is not None for r in stages)
    headers = ("#", "stage", "kind", "criterion", "version", "params before", "params after")
    headers += ("accuracy",) + (("cosine",) if cosine else ()) + (("perplexity",) if ppl else ())
    headers += ("seconds",)
    dense_params = fmt_params(f.dense_params)
    dense = ("-", "dense", "-", "-", "0", dense_params, dense_params, fmt_num(f.dense_accuracy))
    dense += (fmt_num(f.dense_cosine),) if cosine else ()
    dense += (fmt_num(f.dense_lm_perplexity, 2),) if ppl else ()
    rows = [dense + ("-",)]
    for r in stages:
        row = (str(r.index), r.name, r.kind, r.criterion or "-", str(r.version))
        row += (fmt_params(r.params_before), fmt_params(r.params_after), fmt_num(r.accuracy))
        row += (fmt_num(r.cosine),) if cosine else ()
        row += (fmt_num(r.perplexity, 2),) if ppl else ()
        rows.append(row + (f"{r.seconds:.1f}",))
    blocks: list[Block] = [
        Heading("Stages"),
        Paragraph("Stage rows: validation split; the dense row: test split."),
        Table(headers, tuple(rows)),
    ]
    if figures:
        what = "perplexity" if f.lm_perplexity is not None else "accuracy"
        blocks.append(Image(f"{what} per stage", "plots/stages.png"))
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


def confusion_section(report: Report, figures: bool) -> list[Block]:
    if not (figures and report.final.confusion):
        return []
    return [Heading("Confusion matrix"), Image("confusion matrix", "plots/confusion.png")]


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
