"""Pages over many jobs: a comparison (compare.md/.html) and a model family (family.md/.html).

Like the job page (runner/report/job.py), each page is one list of blocks built from its typed JSON
(`CompareResult`, `FamilySummary`) and written by both renderers of runner/report/blocks.py, so the
Markdown and the HTML say the same thing; cells link to the job pages that exist.
"""

from __future__ import annotations

from pathlib import Path

from runner.report.blocks import (
    Block,
    Cell,
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
from runner.report.figures import compare_figure, family_figures
from runner.report.job import write_job_html
from runner.report.model import (
    CompareResult,
    CompareRow,
    FamilyRow,
    FamilySummary,
    every_task_figures,
)


# ----------------------------------------------------------------------------- comparison
def write_compare_report(out_dir: str | Path, result: CompareResult | None = None) -> Path:
    """OUT/compare.md (+ compare.png) and OUT/compare.html; returns the HTML page's path."""
    out_dir = Path(out_dir)
    result = result if result is not None else CompareResult.read(out_dir / "compare.json")
    blocks = compare_page(result, out_dir)
    write_markdown(out_dir / "compare.md", blocks)
    return write_html(out_dir / "compare.html", blocks)


def _budget(result: CompareResult) -> str:
    if result.recovery_tokens is not None:
        return f"{result.recovery_tokens:,} recovery tokens"
    return f"{result.recovery_steps} recovery steps"


def compare_page(result: CompareResult, out_dir: Path) -> list[Block]:
    """The comparison tables; every task's figures add what their rows carry (FinalFigures
    compare_note / compare_section)."""
    tasks = every_task_figures()
    blocks: list[Block] = [
        Heading(f"Comparison: {result.name}", 1),
        Paragraph(
            f"Every method gets the same model, data split, calibration set and "
            f"{_budget(result)} in total (methods without training use "
            "none). Cells: test accuracy / macro-F1 (achieved compression, params, seconds)"
            + ("".join(f.compare_note(result.rows) for f in tasks) or ".")
        ),
    ]
    headers = ("method", *(f"{x:g}x" for x in result.ratios))
    for model in dict.fromkeys(r.model for r in result.rows):
        rows = [r for r in result.rows if r.model == model]
        table = tuple(
            (method, *(_compare_cell(out_dir, rows, method, ratio) for ratio in result.ratios))
            for method in result.methods
        )
        blocks += [Heading(_model_title(model, rows)), Table(headers, table)]
        for f in tasks:
            blocks += f.compare_section(out_dir, rows, result.methods)
    blocks.append(Image("accuracy vs compression", "compare.png", compare_figure(result)))
    return blocks


def _model_title(model: str, rows: list[CompareRow]) -> str:
    """The model's shape, dense accuracy and SIA verdict, from its first run that finished."""
    ok = next((r for r in rows if r.error is None), None)
    if ok is None:
        return f"{model} (every run failed)"
    sia = "SIA not measured"
    if ok.sia_score is not None:
        sia = f"SIA score {ok.sia_score:.3f}, {'satisfied' if ok.sia_satisfied else 'VIOLATED'}"
    return (
        f"{model} ({ok.attention or '?'} + {ok.mlp or '?'}; dense accuracy "
        f"{fmt_num(ok.dense_accuracy)}; {sia})"
    )


def _compare_cell(out_dir: Path, rows: list[CompareRow], method: str, ratio: float) -> Cell:
    r = next((x for x in rows if x.method == method and x.ratio == ratio), None)
    if r is None:
        return "-"
    if r.error is not None:
        return Em("failed", "bad", title=r.error), ": " + r.error.split(":")[0]
    extra = [f"{r.achieved_ratio:.1f}x"]
    extra += [fmt_params(r.params)] if r.params is not None else []
    extra += [f"{r.seconds:.0f}s"] if r.seconds is not None else []
    macro_f1 = r.figures.get("macro_f1")  # the tasks that measure it; "-" for the others
    label = f"{fmt_num(r.accuracy)} / {fmt_num(macro_f1, 3)} ({', '.join(extra)})"
    return page_link(out_dir, r.dir, label)


# ----------------------------------------------------------------------------- family
FAMILY_HEADERS = (
    "model",
    "status",
    "architecture",
    "dense params",
    "pruned (ratio)",
    "accuracy (dense)",
    "SIA (score)",
    "device fit",
    "seconds",
)


def write_family_report(out_dir: str | Path) -> Path:
    """OUT/family.md (+ plots/*.png) and OUT/family.html from OUT/family.json; job pages that
    are missing (a job run with plots off, or by an older version) are written first."""
    out_dir = Path(out_dir)
    summary = FamilySummary.read(out_dir / "family.json")
    for r in summary.models:
        if r.accuracy is not None and not (Path(r.dir) / "report.html").is_file():
            try:
                write_job_html(r.dir)
            except Exception:  # noqa: BLE001 - a missing job page must not lose the family page
                pass
    blocks = family_page(summary, out_dir)
    write_markdown(out_dir / "family.md", blocks)
    return write_html(out_dir / "family.html", blocks)


def family_page(s: FamilySummary, out_dir: Path) -> list[Block]:
    target = ", ".join(f"{k}={v}" for k, v in s.target.items())
    ex, counts = s.execution, s.counts
    intro = (
        f"Method {s.method}, target {target}, {ex.mode} execution ({ex.cpus_per_job:g} CPU / "
        f"{ex.gpus_per_job:g} GPU per job); {counts.get('done', 0)} run, "
        f"{counts.get('skipped', 0)} reused, {counts.get('failed', 0)} failed in {s.seconds:.0f} s."
    )
    blocks: list[Block] = [Heading(f"Family: {s.name}", 1)]
    blocks += [Paragraph(s.description)] if s.description else []
    rows = tuple(_family_row(out_dir, r) for r in s.models)
    blocks += [Paragraph(intro), Table(FAMILY_HEADERS, rows)]
    figures = family_figures(s.models)
    return blocks + [Image(_FIGURE_ALT[name], f"plots/{name}", png) for name, png in figures]


_FIGURE_ALT = {
    "size.png": "accuracy and parameters vs model size",
    "sia.png": "SIA score per model",
    "device.png": "peak memory vs device budget",
}


def _verdict(flag: bool | None, yes: str, no: str) -> Cell:
    return "-" if flag is None else Em(yes, "ok") if flag else Em(no, "bad")


def _family_row(out_dir: Path, r: FamilyRow) -> tuple[Cell, ...]:
    """A finished model's figures, or a failed one's ref and error."""
    if r.accuracy is None:
        return (r.ref, (Em("failed", "bad"), f": {r.error or '?'}")) + ("-",) * 7
    return (
        page_link(out_dir, r.dir, r.model),
        r.status,
        f"{r.architecture} ({r.attention}/{r.mlp})",
        fmt_params(r.dense_params),
        f"{fmt_params(r.params)} ({r.compression_ratio:.2f}x)",
        f"{fmt_num(r.accuracy)} ({fmt_num(r.dense_accuracy)})",
        (_verdict(r.sia_satisfied, "ok", "violated"), f" ({fmt_num(r.sia_score, 3)})"),
        _verdict(r.fits, "fits", "does not fit"),
        f"{r.seconds or 0:.0f}",
    )
