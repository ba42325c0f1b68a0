"""`cascade compare`: every method at every ratio on the same model, data, calibration and step budget."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from runner.config import (
    ConfigError,
    ModelConfig,
    Strict,
    apply_overrides,
    duplicate_output_names,
    model_entries,
    same_job,
)
from runner.job import run_job
from runner.methods import compose, load_method
from stages.atomic import write_json_atomic


class CompareConfig(Strict):
    name: str = "compare"
    methods: list[str] = Field(min_length=1)
    ratios: list[float] = Field(min_length=1)
    recovery_steps: int = Field(300, ge=0, description="total recovery steps given to every method")
    job: dict[str, Any] = Field(
        description="base job: models, data, calibration, sia, cluster ... (no stages)"
    )


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("", f"config file not found: {path}")], str(path))
    raw = yaml.safe_load(path.read_text()) or {}
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        cfg = CompareConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            [(".".join(map(str, e["loc"])), e["msg"]) for e in exc.errors()], str(path)
        ) from None
    problems = [(f"ratios.{i}", "must be > 1") for i, r in enumerate(cfg.ratios) if r <= 1]
    if "stages" in cfg.job:
        problems.append(("job.stages", "stages come from the method presets; remove them here"))
    for i, m in enumerate(cfg.methods):
        try:
            load_method(m)
        except ConfigError as exc:
            problems.append((f"methods.{i}", exc.problems[0][1]))
    problems += _model_problems(cfg.job.get("models") or [])
    if problems:
        raise ConfigError(problems, str(path))
    return cfg


def _model_problems(entries) -> list[tuple[str, str]]:
    """Bad model entries and two models sharing one run directory, with their job.models paths."""
    problems = []
    entries = model_entries(entries)
    if not isinstance(entries, list):
        return [("job.models", "expected a ref or a list of refs / {ref: ...} mappings")]
    for i, entry in enumerate(entries):
        try:
            ModelConfig.model_validate(entry)
        except ValidationError as exc:
            problems += [
                (".".join(map(str, ("job.models", i, *e["loc"]))), e["msg"]) for e in exc.errors()
            ]
    return problems + duplicate_output_names(entries, "job.models")


def run_compare(cfg: CompareConfig, out: str | Path, *, log=print) -> dict:
    """Runs (or reuses finished) jobs under out/<model>/<method>/<ratio>x and writes compare.{json,md,png}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    models = model_entries(cfg.job.get("models")) or []
    for model in models:
        for method in cfg.methods:
            preset = load_method(method)
            for ratio in cfg.ratios:
                rows.append(_run_one(cfg, out, model, preset, ratio, log))
    result = {
        "name": cfg.name,
        "methods": cfg.methods,
        "ratios": cfg.ratios,
        "recovery_steps": cfg.recovery_steps,
        "rows": rows,
    }
    write_json_atomic(out / "compare.json", result)
    (out / "compare.md").write_text(render_compare(result))
    plot_compare(result, out / "compare.png")
    from runner.report_html import write_compare_html

    write_compare_html(out)
    return result


def _run_one(cfg: CompareConfig, out: Path, model, preset, ratio: float, log) -> dict:
    """One method at one ratio; `model` is the job's entry as a mapping ({ref, settings...}).

    A finished run is reused only when it ran exactly the job composed now (same settings).
    """
    model_cfg = ModelConfig.model_validate(model)
    name = model_cfg.output_name
    run_dir = out / name / preset.name / f"{ratio:g}x"
    row = {
        "model": name,
        "ref": model_cfg.ref,
        "method": preset.name,
        "ratio": ratio,
        "dir": str(run_dir),
    }
    base = dict(cfg.job, models=[model], name=cfg.name)
    job = compose(base, preset, ratio=ratio, recovery_steps=cfg.recovery_steps)
    report_path, job_path = run_dir / "report.json", run_dir / "job.yaml"
    if report_path.is_file() and job_path.is_file():
        if same_job(job_path.read_text(), job):
            log(f"[compare] {name} {preset.name} {ratio:g}x: finished earlier, reusing")
            return row | _summary(json.loads(report_path.read_text()))
        log(f"[compare] {name} {preset.name} {ratio:g}x: settings changed, running again")
    log(f"[compare] {name} {preset.name} {ratio:g}x ...")
    t0 = time.perf_counter()
    try:
        report = run_job(job, run_dir, force=True, log=lambda m: None)[name]
    except Exception as exc:  # noqa: BLE001 - one failing method must not stop the comparison
        log(f"[compare] {name} {preset.name} {ratio:g}x FAILED: {exc}")
        return row | {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
    row |= _summary(report)
    log(
        f"[compare] {name} {preset.name} {ratio:g}x: {row['achieved_ratio']:.2f}x, accuracy {row['accuracy']:.4f}"
    )
    return row


def _summary(report: dict) -> dict:
    f = report["final"]
    return {
        "architecture": report["model"]["architecture"],
        "attention": report["model"]["attention"],
        "mlp": report["model"]["mlp"],
        "achieved_ratio": f["compression_ratio"],
        "accuracy": f["accuracy"],
        "macro_f1": f["macro_f1"],
        "heldout_accuracy": f.get("heldout_accuracy"),
        "params": f["params"],
        "dense_accuracy": f["dense_accuracy"],
        "seconds": report["timing"]["total_seconds"],
        "sia_score": (report.get("sia") or {}).get("score"),
        "sia_satisfied": (report.get("sia") or {}).get("satisfied"),
    }


def render_compare(result: dict) -> str:
    lines = [
        f"# Comparison: {result['name']}",
        "",
        f"Every method gets the same model, data split, calibration set and {result['recovery_steps']} "
        "recovery steps in total (methods without training use none). Cells: test accuracy / macro-F1 "
        "(achieved compression, params, seconds).",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == model]
        ok = next((r for r in rows if "error" not in r), {})
        score = ok.get("sia_score")
        sia = (
            "SIA not measured"
            if score is None
            else (
                f"SIA score {score:.3f}, {'satisfied' if ok.get('sia_satisfied') else 'VIOLATED'}"
            )
        )
        lines += [
            f"## {model} ({ok.get('attention', '?')} + {ok.get('mlp', '?')}; dense accuracy "
            f"{ok.get('dense_accuracy', float('nan')):.4f}; {sia})",
            "",
        ]
        lines.append("| method | " + " | ".join(f"{r:g}x" for r in result["ratios"]) + " |")
        lines.append("|---" * (len(result["ratios"]) + 1) + "|")
        for method in result["methods"]:
            cells = []
            for ratio in result["ratios"]:
                r = next((x for x in rows if x["method"] == method and x["ratio"] == ratio), None)
                if r is None:
                    cells.append("-")
                elif "error" in r:
                    cells.append("failed: " + r["error"].split(":")[0])
                else:
                    cells.append(
                        f"{r['accuracy']:.4f} / {r['macro_f1']:.3f} ({r['achieved_ratio']:.1f}x, "
                        f"{r['params'] / 1e3:.0f}k, {r['seconds']:.0f}s)"
                    )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("![accuracy vs compression](compare.png)")
    return "\n".join(lines) + "\n"


def plot_compare(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in result["methods"]:
            pts = sorted(
                (r["achieved_ratio"], r["accuracy"])
                for r in result["rows"]
                if r["model"] == model and r["method"] == method and "error" not in r
            )
            if pts:
                ax.plot(*zip(*pts), "o-", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("compression (dense / pruned params)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(model)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
