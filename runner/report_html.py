"""Self-contained HTML reports people want to read: one job, a comparison, a model family.

Every picture is embedded as a base64 PNG and the CSS is inline, so a report.html can be mailed or
opened from any copy of the directory, offline. The pictures of one job are drawn by
runner.report_layout.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path

from runner.report import finetune_sentence
from runner.report_layout import (
    confusion_figure,
    family_plots,
    layer_breakdown,
    layout_figure,
    stages_figure,
)

_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}"
    ".ok{color:#187a2f;font-weight:bold}.bad{color:#b00020;font-weight:bold}img{max-width:100%}"
)


def _img(b64: str, alt: str) -> str:
    return f'<p><img alt="{escape(alt)}" src="data:image/png;base64,{b64}"></p>'


def _file_img(path: Path, alt: str) -> str:
    return _img(base64.b64encode(path.read_bytes()).decode("ascii"), alt) if path.is_file() else ""


def _page(title: str, body: list[str]) -> str:
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _num(n, digits: int = 4) -> str:
    return "-" if n is None else f"{n:.{digits}f}"


def _params(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _verdict(flag, yes: str, no: str) -> str:
    return (
        "-"
        if flag is None
        else f'<span class="{"ok" if flag else "bad"}">{yes if flag else no}</span>'
    )


# ----------------------------------------------------------------------------- job page
def _breakdown_table(bd: dict) -> str:
    def totals(c: dict) -> list[int]:
        return (
            [c["embeddings"]]
            + [sum(x[k] for x in c["layers"]) for k in ("attention", "mlp", "norm")]
            + [c["other"]]
        )

    labels = ["embeddings", "attention", "MLP", "layer norms", "head / final norm"]
    pruned, dense = totals(bd["pruned"]), totals(bd["dense"]) if bd["dense"] else None
    rows = [
        [label, _params(dense[i]) if dense else "-", _params(p)]
        for i, (label, p) in enumerate(zip(labels, pruned))
    ]
    return _table(["part", "dense", "pruned"], rows)


def _extra_metrics_html(f: dict) -> list[str]:
    """Dense fine-tuning, embedding agreement and perplexity, when the job has them."""
    out = []
    if f.get("dense_finetune"):
        out.append(f"<p>{escape(finetune_sentence(f['dense_finetune']))}</p>")
    if f.get("cosine") is not None:
        out.append(
            f"<p>Embedding model: mean cosine similarity to the dense embeddings <b>{_num(f['cosine'])}</b> "
            f"on test sentences, {_num(f.get('heldout_cosine'))} on held-out-load sentences. Accuracy is "
            "leave-one-out 1-NN fault classification with the embeddings.</p>"
        )
    if f.get("perplexity"):
        p = f["perplexity"]
        out.append(
            f"<p>Perplexity on {escape(str(p['file']))} ({p['tokens']:,} tokens): "
            f"<b>{p['perplexity']:.2f}</b> (dense {p['dense']:.2f}).</p>"
        )
    return out


def job_html(report: dict, breakdown: dict | None) -> str:
    m, f, sia = report["model"], report["final"], report.get("sia") or {}
    body = [
        f"<p>{escape(m['architecture'])} ({escape(m['attention'])} attention, {escape(m['mlp'])} MLP): "
        f"{_params(f['dense_params'])} &rarr; {_params(f['params'])} parameters "
        f"(<b>{f['compression_ratio']:.2f}x</b>). Test accuracy <b>{_num(f['accuracy'])}</b> "
        f"(dense {_num(f['dense_accuracy'])}), macro-F1 {_num(f.get('macro_f1'))}, held-out loads "
        f"{_num(f.get('heldout_accuracy'))} (dense {_num(f.get('dense_heldout_accuracy'))}). "
        "Final figures are measured on the exported checkpoint reloaded from disk.</p>",
        *_extra_metrics_html(f),
        *(f'<p class="bad"><b>Warning:</b> {escape(w)}.</p>' for w in report.get("warnings") or []),
        "<h2>Structural Independence Assumption</h2>",
    ]
    if sia:
        per = sia.get("per_granularity") or {}
        body.append(
            f"<p>{_verdict(sia.get('satisfied'), 'satisfied', 'VIOLATED')}: score {_num(sia.get('score'), 3)} "
            f"(threshold {sia.get('threshold')}, policy {escape(str(sia.get('policy', '-')))}). "
            + ", ".join(f"{escape(k)}: {_num(v, 3)}" for k, v in per.items())
            + "</p>"
        )
    else:
        body.append("<p>SIA check not run.</p>")
    rows = [
        [
            "-",
            "dense",
            "-",
            "-",
            0,
            _params(f["dense_params"]),
            _params(f["dense_params"]),
            _num(f["dense_accuracy"]),
            "-",
        ]
    ]
    rows += [
        [
            r.get("index", i),
            escape(r["name"]),
            r["kind"],
            escape(str(r.get("criterion") or "-")),
            r["version"],
            _params(r["params_before"]),
            _params(r["params_after"]),
            _num(r["accuracy"]),
            f"{r['seconds']:.1f}",
        ]
        for i, r in enumerate(report["stages"])
    ]
    body += [
        "<h2>Stages</h2>",
        _table(
            [
                "#",
                "stage",
                "kind",
                "criterion",
                "version",
                "params before",
                "params after",
                "accuracy",
                "seconds",
            ],
            rows,
        ),
        _img(stages_figure(report), "accuracy per stage"),
    ]
    if breakdown:
        body += [
            "<h2>Parameters per layer</h2>",
            _breakdown_table(breakdown),
            _img(layout_figure(report, breakdown), "pruned layout"),
        ]
    v = report.get("validation")
    if v:
        body += [
            "<h2>Device fit</h2>",
            f"<p>{escape(str(v['device']))}: budget {v['budget_bytes'] / 2**30:.2f} GiB, peak "
            f"{v['peak_bytes'] / 2**30:.3f} GiB (dense {(v.get('dense_peak_bytes') or 0) / 2**30:.3f} GiB): "
            f"{_verdict(v['fits'], 'fits', 'DOES NOT FIT')}.</p>",
        ]
        lat = v.get("latency_ms") or {}
        if lat:
            body.append(
                f"<p>Latency: dense {_num(lat.get('dense'), 2)} ms, pruned {_num(lat.get('pruned'), 2)} ms.</p>"
            )
    if f.get("confusion"):
        body += [
            "<h2>Confusion matrix</h2>",
            _img(confusion_figure(f["confusion"]), "confusion matrix"),
        ]
    body.append(f"<p>Total time {report['timing']['total_seconds']:.1f} s.</p>")
    return _page(f"Compression report: {m['name']}", body)


def write_job_html(out_dir: str | Path) -> Path:
    """OUT/report.html from OUT/report.json (+ OUT/checkpoint/config.json for the layer picture)."""
    out_dir = Path(out_dir)
    report = json.loads((out_dir / "report.json").read_text())
    try:
        breakdown = layer_breakdown(out_dir)
    except Exception:  # noqa: BLE001 - an unknown layout must not cost the rest of the report
        breakdown = None
    path = out_dir / "report.html"
    path.write_text(job_html(report, breakdown), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- compare page
def _link(out_dir: Path, run_dir: str, label: str) -> str:
    page = Path(run_dir) / "report.html"
    if not page.is_file():
        return escape(label)
    try:
        href = page.relative_to(out_dir)
    except ValueError:
        href = page
    return f'<a href="{escape(str(href))}">{escape(label)}</a>'


def write_compare_html(out_dir: str | Path) -> Path:
    """OUT/compare.html from OUT/compare.json (+ compare.png when it was drawn)."""
    out_dir = Path(out_dir)
    result = json.loads((out_dir / "compare.json").read_text())
    body = [
        f"<p>Every method gets the same model, data, calibration set and {result['recovery_steps']} "
        "recovery steps in total. Cells: test accuracy / macro-F1 (achieved compression).</p>"
    ]
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == model]
        table = []
        for method in result["methods"]:
            cells = [escape(method)]
            for ratio in result["ratios"]:
                r = next((x for x in rows if x["method"] == method and x["ratio"] == ratio), None)
                if r is None:
                    cells.append("-")
                elif "error" in r:
                    cells.append(f'<span class="bad" title="{escape(r["error"])}">failed</span>')
                else:
                    label = (
                        f"{r['accuracy']:.4f} / {r['macro_f1']:.3f} ({r['achieved_ratio']:.1f}x)"
                    )
                    cells.append(_link(out_dir, r["dir"], label))
            table.append(cells)
        body += [
            f"<h2>{escape(model)}</h2>",
            _table(["method"] + [f"{x:g}x" for x in result["ratios"]], table),
        ]
    body.append(_file_img(out_dir / "compare.png", "accuracy vs compression"))
    path = out_dir / "compare.html"
    path.write_text(_page(f"Comparison: {result['name']}", body), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- family report
FAMILY_PLOTS = ("size.png", "sia.png", "device.png")


_FINAL_KEYS = (
    "dense_params params compression_ratio accuracy dense_accuracy macro_f1 heldout_accuracy"
)


def family_row(name: str, ref: str, out: Path, result: dict) -> dict:
    """One model's line of family.json: status, error, headline numbers, SIA and device fit."""
    row = {"model": name, "ref": ref, "dir": str(out), "status": result["status"]}
    row |= {"error": result["error"]} if "error" in result else {}
    rep = result.get("report")
    if not rep:
        return row | ({"seconds": result["seconds"]} if "seconds" in result else {})
    sia, val = rep.get("sia") or {}, rep.get("validation") or {}
    row |= {k: rep["model"][k] for k in ("architecture", "attention", "mlp")}
    row |= {k: rep["final"].get(k) for k in _FINAL_KEYS.split()}
    row |= {f"sia_{k}": sia.get(k) for k in ("score", "threshold", "satisfied")}
    row |= {k: val.get(k) for k in ("device", "budget_bytes", "peak_bytes", "fits")}
    return row | {"seconds": rep["timing"]["total_seconds"]}


def _flag(flag, yes: str, no: str, html: bool) -> str:
    if flag is None or html:
        return _verdict(flag, yes, no)
    return yes if flag else no


def _family_rows(out_dir: Path, s: dict, html: bool) -> list[list]:
    """Table rows for family.md (html=False) and family.html; a failed model shows its error."""
    rows = []
    for r in s["models"]:
        if "accuracy" not in r:
            err = r.get("error", "?")
            status = f'<span class="bad">failed</span>: {escape(err)}' if html else f"failed: {err}"
            rows.append([escape(r["ref"]), status.replace("|", "/")] + ["-"] * 7)
            continue
        md_link = f"[{r['model']}]({r['model']}/report.md)"
        rows.append(
            [
                _link(out_dir, r["dir"], r["model"]) if html else md_link,
                r["status"],
                f"{r['architecture']} ({r['attention']}/{r['mlp']})",
                _params(r["dense_params"]),
                f"{_params(r['params'])} ({r['compression_ratio']:.2f}x)",
                f"{_num(r['accuracy'])} ({_num(r['dense_accuracy'])})",
                f"{_flag(r['sia_satisfied'], 'ok', 'violated', html)} ({_num(r['sia_score'], 3)})",
                _flag(r.get("fits"), "fits", "does not fit", html),
                f"{r.get('seconds') or 0:.0f}",
            ]
        )
    return rows


_FAMILY_HEADERS = [
    "model",
    "status",
    "architecture",
    "dense params",
    "pruned (ratio)",
    "accuracy (dense)",
    "SIA (score)",
    "device fit",
    "seconds",
]


def _family_intro(s: dict) -> str:
    target = ", ".join(f"{k}={v}" for k, v in s["target"].items())
    return (
        f"Method {s['method']}, target {target}, {s['execution']['mode']} execution "
        f"({s['execution']['cpus_per_job']:g} CPU / {s['execution']['gpus_per_job']:g} GPU per job); "
        f"{s['counts']['done']} run, {s['counts']['skipped']} reused, {s['counts']['failed']} failed "
        f"in {s['seconds']:.0f} s."
    )


def write_family_report(out_dir: str | Path) -> None:
    """family.md + plots/*.png + family.html from OUT/family.json; job pages that are missing."""
    out_dir = Path(out_dir)
    s = json.loads((out_dir / "family.json").read_text())
    for r in s["models"]:
        if "accuracy" in r and not (Path(r["dir"]) / "report.html").is_file():
            try:
                write_job_html(r["dir"])
            except Exception:  # noqa: BLE001 - a missing job page must not lose the family page
                pass
    images = family_plots(out_dir, s["models"])
    intro = _family_intro(s)
    md = [
        f"# Family: {s['name']}",
        "",
        intro,
        "",
        "| " + " | ".join(_FAMILY_HEADERS) + " |",
        "|---" * len(_FAMILY_HEADERS) + "|",
    ]
    md += ["| " + " | ".join(map(str, row)) + " |" for row in _family_rows(out_dir, s, html=False)]
    md += [""] + [f"![{p.stem}](plots/{p.name})" for p in images]
    (out_dir / "family.md").write_text("\n".join(md) + "\n")
    write_family_html(out_dir)


def write_family_html(out_dir: str | Path) -> Path:
    """OUT/family.html from OUT/family.json and the family plots (embedded)."""
    out_dir = Path(out_dir)
    s = json.loads((out_dir / "family.json").read_text())
    body = [
        f"<p>{escape(s.get('description') or '')}</p><p>{escape(_family_intro(s))}</p>",
        _table(_FAMILY_HEADERS, _family_rows(out_dir, s, html=True)),
    ]
    body += [_file_img(out_dir / "plots" / name, name) for name in FAMILY_PLOTS]
    path = out_dir / "family.html"
    path.write_text(_page(f"Family: {s['name']}", body), encoding="utf-8")
    return path
