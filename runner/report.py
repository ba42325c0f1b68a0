"""report.json, report.md and plots for one model's job, and a summary across models."""

from __future__ import annotations

from pathlib import Path

from stages.atomic import write_json_atomic


def write_report(out: Path, report: dict, *, plots: bool = True) -> None:
    out = Path(out)
    write_json_atomic(out / "report.json", report)
    images = _plot_stages(out / "plots", report) if plots else []
    (out / "report.md").write_text(render_markdown(report, images))


def _fmt_params(n) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def finetune_sentence(tune: dict) -> str:
    """One line for report.md and report.html: how the dense model got its task head."""
    return (
        f"The dense model was fine-tuned first: {tune['steps']} steps at lr {tune['lr']:g}, "
        f"training loss {tune['first_loss']:.3f} -> {tune['last_loss']:.3f}"
        + (" (weights loaded from the fine-tune cache)." if tune.get("cached") else ".")
    )


def render_markdown(report: dict, images: list[str]) -> str:
    m, f, sia = report["model"], report["final"], report.get("sia") or {}
    lines = [
        f"# Compression report: {m['name']}",
        "",
        f"Architecture {m['architecture']} ({m['attention']} attention, {m['mlp']} MLP), "
        f"{_fmt_params(f['dense_params'])} -> {_fmt_params(f['params'])} parameters "
        f"(**{f['compression_ratio']:.2f}x**).",
        "",
        f"Test accuracy {f['accuracy']:.4f} (dense {f['dense_accuracy']:.4f}), macro-F1 {f['macro_f1']:.4f}, "
        f"held-out load accuracy {f['heldout_accuracy']:.4f} (dense {f['dense_heldout_accuracy']:.4f}). "
        "Final figures are measured on the exported checkpoint reloaded from disk.",
        "",
    ]
    lines += [f"**WARNING:** {w}." for w in report.get("warnings") or []]
    lines += [""] if report.get("warnings") else []
    if f.get("dense_finetune"):
        lines += [finetune_sentence(f["dense_finetune"]), ""]
    if f.get("perplexity"):
        ppl = f["perplexity"]
        lines += [
            f"Perplexity on {ppl['file']} ({ppl['tokens']:,} tokens, windows of {ppl['window']}): "
            f"{ppl['perplexity']:.2f} (dense {ppl['dense']:.2f}), through the source checkpoint's LM head.",
            "",
        ]
    if f.get("cosine") is not None:
        lines += [
            f"Embedding model: mean cosine similarity to the dense embeddings {f['cosine']:.4f} on test "
            f"sentences, {f['heldout_cosine']:.4f} on held-out-load sentences (never distilled on). "
            "Accuracy above is leave-one-out 1-NN fault classification with the embeddings.",
            "",
        ]
    if sia:
        verdict = "satisfied" if sia.get("satisfied") else "VIOLATED"
        lines += [
            f"SIA: {verdict} (score {sia.get('score', float('nan')):.3f}, threshold {sia.get('threshold')}).",
            "",
        ]
    lines += [
        "| # | stage | kind | criterion | version | params before | params after | val accuracy | val cosine | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["stages"]:
        cosine = f"{r['cosine']:.4f}" if r.get("cosine") is not None else "-"
        lines.append(
            f"| {r['index']} | {r['name']} | {r['kind']} | {r.get('criterion') or '-'} | {r['version']} | "
            f"{_fmt_params(r['params_before'])} | {_fmt_params(r['params_after'])} | {r['accuracy']:.4f} | {cosine} | {r['seconds']:.1f} |"
        )
    v = report.get("validation")
    if v:
        lines += [
            "",
            f"Device {v['device']}: budget {v['budget_bytes'] / 2**30:.2f} GiB, "
            f"peak {v['peak_bytes'] / 2**30:.3f} GiB -> {'fits' if v['fits'] else 'DOES NOT FIT'}.",
        ]
    lines += ["", f"Total time {report['timing']['total_seconds']:.1f} s.", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in images]
    return "\n".join(lines) + "\n"


def _plot_stages(plot_dir: Path, report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    names = ["dense"] + [r["name"] for r in report["stages"]]
    params = [report["final"]["dense_params"]] + [r["params_after"] for r in report["stages"]]
    acc = [report["final"]["dense_accuracy"]] + [r["accuracy"] for r in report["stages"]]
    fig, ax1 = plt.subplots(figsize=(8, 4))
    ax1.plot(names, acc, "o-", color="tab:blue", label="accuracy")
    ax1.set_ylabel("accuracy (validation; dense: test)")
    ax1.set_ylim(0, 1.02)
    ax2 = ax1.twinx()
    ax2.bar(names, [p / 1e6 for p in params], alpha=0.3, color="tab:orange", label="params (M)")
    ax2.set_ylabel("parameters (M)")
    ax1.set_title(f"{report['model']['name']}: accuracy and size per stage")
    ax1.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path = plot_dir / "stages.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [f"plots/{path.name}"]


def write_summary(out: Path, reports: dict[str, dict]) -> None:
    rows = {
        name: {
            "compression_ratio": r["final"]["compression_ratio"],
            "accuracy": r["final"]["accuracy"],
            "dense_accuracy": r["final"]["dense_accuracy"],
            "params": r["final"]["params"],
            "sia_satisfied": (r.get("sia") or {}).get("satisfied"),
        }
        for name, r in reports.items()
    }
    write_json_atomic(Path(out) / "summary.json", rows)
    lines = [
        "# Job summary",
        "",
        "| model | params | compression | accuracy | dense accuracy | SIA |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| [{name}]({name}/report.md) | {_fmt_params(r['params'])} | {r['compression_ratio']:.2f}x | "
            f"{r['accuracy']:.4f} | {r['dense_accuracy']:.4f} | {r['sia_satisfied']} |"
        )
    (Path(out) / "summary.md").write_text("\n".join(lines) + "\n")
