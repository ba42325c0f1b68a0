"""Pictures for the reports: one job's stages, pruned layout per layer and confusion matrix;
a family's accuracy / size / SIA / device-fit plots.

The per-layer parameter counts come from the checkpoint's config ("pruning" layout section) and the
source model's dense shape, both built on the meta device: exact counts, no weights read.
"""

from __future__ import annotations

import base64
import copy
import io
from pathlib import Path

import transformers

from stages.checkpoint import build_on_meta


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_base64(fig) -> str:
    """The figure as base64 PNG (and closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- layer breakdown
def _build_meta(config, layouts=None):
    """The architecture as parameter-less meta tensors (shapes only), optionally resized."""
    if not getattr(config, "architectures", None):
        config = copy.deepcopy(config)
        config.architectures = ["AutoModel"]
    cls = getattr(transformers, config.architectures[0])
    return build_on_meta(config, cls=cls, layouts=layouts)


def _count(model) -> dict:
    from stages.arch import get_adapter

    adapter = get_adapter(model)
    layers = adapter.layers(model)
    in_layer = {id(p) for layer in layers for p in layer.parameters()}
    per_layer = []
    for layer in layers:
        parts = {"attention": 0, "mlp": 0, "norm": 0}
        for name, p in layer.named_parameters():
            low = name.lower()
            key = "attention" if "attn" in low or "attention" in low else "mlp"
            parts["norm" if "norm" in low or "ln_" in low else key] += p.numel()
        per_layer.append(parts)
    outside = [(n, p) for n, p in model.named_parameters() if id(p) not in in_layer]
    emb = sum(p.numel() for n, p in outside if any(k in n for k in ("emb", "wte", "wpe")))
    other = sum(p.numel() for _, p in outside) - emb
    layouts = [vars(x) for x in adapter.layout(model)]
    return {"layers": per_layer, "layouts": layouts, "embeddings": emb, "other": other}


def _dense_model(config, source: str | None):
    """The source model's dense shape: built-in demo spec, or the source checkpoint's config."""
    from runner.models import DEMO_MODELS
    from stages.arch import LayerLayout

    if source in DEMO_MODELS:
        s = DEMO_MODELS[source]
        return _build_meta(config, [LayerLayout(s.heads, s.kv_heads, s.intermediate)] * s.layers)
    if source and (Path(source) / "config.json").is_file():
        from transformers import AutoConfig

        src = AutoConfig.from_pretrained(source)
        src.architectures, src.num_labels = config.architectures, config.num_labels
        return _build_meta(src)
    return None


def layer_breakdown(job_dir: str | Path) -> dict | None:
    """Params per layer (attention / MLP / norms) + embeddings, pruned and dense; None if unknown."""
    from transformers import AutoConfig

    from stages.arch import LayerLayout

    ckpt = Path(job_dir) / "checkpoint"
    if not (ckpt / "config.json").is_file():
        return None
    config = AutoConfig.from_pretrained(str(ckpt))
    pruning = getattr(config, "pruning", None) or {}
    layouts = [LayerLayout(**x) for x in pruning.get("layout", [])]
    if not layouts:
        return None
    result = {"pruned": _count(_build_meta(config, layouts)), "dense": None}
    try:
        dense = _dense_model(config, pruning.get("source_model"))
        result["dense"] = _count(dense) if dense is not None else None
    except Exception:  # noqa: BLE001 - the dense picture is a bonus; the pruned one stands alone
        pass
    return result


# ----------------------------------------------------------------------------- job figures
def stages_figure(report: dict) -> str:
    plt = _plt()
    f = report["final"]
    names = ["dense"] + [r["name"] for r in report["stages"]] + ["final (export)"]
    acc = [f["dense_accuracy"]] + [r["accuracy"] for r in report["stages"]] + [f["accuracy"]]
    params = [f["dense_params"]] + [r["params_after"] for r in report["stages"]] + [f["params"]]
    fig, ax = plt.subplots(figsize=(9, 3.8))
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
    fig.tight_layout()
    return png_base64(fig)


def _origins(report: dict, n: int) -> list[int]:
    origin = (report["stages"][-1].get("layer_origin") if report["stages"] else None) or []
    return list(origin) if len(origin) == n else list(range(n))


def layout_figure(report: dict, bd: dict) -> str:
    plt = _plt()
    pruned, dense = bd["pruned"], bd["dense"]
    origins = _origins(report, len(pruned["layers"]))
    n = len(dense["layers"]) if dense else max(origins) + 1
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    if dense:
        att = [x["attention"] for x in dense["layers"]]
        mlp = [x["mlp"] + x["norm"] for x in dense["layers"]]
        ax.bar(range(n), att, color="none", edgecolor="tab:blue", ls="--", label="dense attention")
        ax.bar(
            range(n),
            mlp,
            bottom=att,
            color="none",
            edgecolor="tab:green",
            ls="--",
            label="dense MLP",
        )
    att = [x["attention"] for x in pruned["layers"]]
    mlp = [x["mlp"] + x["norm"] for x in pruned["layers"]]
    ax.bar(origins, att, color="tab:blue", alpha=0.8, label="pruned attention")
    ax.bar(origins, mlp, bottom=att, color="tab:green", alpha=0.8, label="pruned MLP (+norms)")
    for i in sorted(set(range(n)) - set(origins)):
        ax.text(i, 0, "removed", rotation=90, ha="center", va="bottom", color="tab:red")
    ax.set_ylabel("parameters")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("parameters per layer (original layer index)")
    units = [
        ("num_heads", "query heads"),
        ("num_kv_heads", "KV heads"),
        ("intermediate_size", "FFN channels"),
    ]
    every = pruned["layouts"] + (dense["layouts"] if dense else [])
    if all(x["num_kv_heads"] == x["num_heads"] for x in every):
        units.pop(1)  # MHA: KV heads are the query heads
    width = 0.8 / len(units)
    ref = dense["layouts"] if dense else None
    for k, (key, label) in enumerate(units):
        kept = [
            lay[key] / (ref[o][key] if ref and o < len(ref) else 1)
            for o, lay in zip(origins, pruned["layouts"])
        ]
        offset = (k - (len(units) - 1) / 2) * width
        ax2.bar([o + offset for o in origins], kept, width, label=label)
    ax2.set_ylabel("kept / dense" if dense else "kept units")
    ax2.set_xlabel("layer")
    ax2.set_xticks(range(n))
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return png_base64(fig)


def confusion_figure(confusion: list[list[int]]) -> str:
    from runner.data import CLASS_NAMES

    plt = _plt()
    size = len(confusion)
    names = list(CLASS_NAMES) if size == len(CLASS_NAMES) else [str(i) for i in range(size)]
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    ax.imshow(confusion, cmap="Blues")
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(size), names, rotation=60, fontsize=7)
    ax.set_yticks(range(size), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test split, exported checkpoint)")
    fig.tight_layout()
    return png_base64(fig)


# ----------------------------------------------------------------------------- family plots
def family_plots(out_dir: Path, rows: list[dict]) -> list[Path]:
    """plots/size.png (accuracy and params vs dense size), sia.png, device.png (when validated)."""
    plt = _plt()
    ok = sorted((r for r in rows if "accuracy" in r), key=lambda r: r["dense_params"])
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if ok:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        human = FuncFormatter(lambda v, _: f"{v / 1e6:.3g}M" if v >= 1e5 else f"{v / 1e3:.3g}k")
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for arch in dict.fromkeys(r["architecture"] for r in ok):
            pts = [r for r in ok if r["architecture"] == arch]
            x = [r["dense_params"] for r in pts]
            label = f"{arch.removesuffix('ForSequenceClassification')} ({pts[0]['attention']}/{pts[0]['mlp']})"
            line = ax.plot(x, [r["accuracy"] for r in pts], "o-", label=f"{label} pruned")[0]
            color = line.get_color()
            ax.plot(
                x,
                [r["dense_accuracy"] for r in pts],
                "s--",
                color=color,
                alpha=0.5,
                label=f"{label} dense",
            )
            ax2.plot(x, [r["params"] for r in pts], "o-", color=color, label=f"{label} pruned")
            ax2.plot(x, x, "s--", color=color, alpha=0.5, label=f"{label} dense")
            for r in pts:
                ax.annotate(
                    r["model"],
                    (r["dense_params"], r["accuracy"]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        lowest = min(min(r["accuracy"], r["dense_accuracy"]) for r in ok)
        ax.set(
            ylim=(max(0.0, lowest - 0.1), 1.02),
            xlabel="dense parameters",
            ylabel="test accuracy",
            title="accuracy vs model size",
        )
        ax2.set(
            ylim=(0, None),
            xlabel="dense parameters",
            ylabel="parameters",
            title="parameters vs model size",
        )
        for a in (ax, ax2):
            a.set_xscale("log")
            a.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            a.xaxis.set_major_formatter(human)
            a.xaxis.set_minor_formatter(NullFormatter())
            a.grid(alpha=0.3)
            a.legend(fontsize=6)
        ax2.yaxis.set_major_formatter(human)
        written.append(_save(fig, plot_dir / "size.png"))
    sia = [r for r in ok if r.get("sia_score") is not None]
    if sia:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        colors = ["tab:green" if r["sia_satisfied"] else "tab:red" for r in sia]
        ax.bar([r["model"] for r in sia], [r["sia_score"] for r in sia], color=colors)
        ax.axhline(sia[0]["sia_threshold"], color="k", ls="--", label="threshold")
        ax.set(ylabel="SIA score (lower: more independent)", title="SIA score per model")
        ax.tick_params(axis="x", rotation=25)
        ax.legend()
        written.append(_save(fig, plot_dir / "sia.png"))
    dev = [r for r in ok if r.get("fits") is not None]
    if dev:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        colors = ["tab:green" if r["fits"] else "tab:red" for r in dev]
        ax.bar(
            [r["model"] for r in dev],
            [r["peak_bytes"] / 2**30 for r in dev],
            color=colors,
            label="peak",
        )
        budgets = [r["budget_bytes"] / 2**30 for r in dev]
        xs = range(len(dev))
        ax.hlines(
            budgets, [x - 0.45 for x in xs], [x + 0.45 for x in xs], "k", "--", label="budget"
        )
        ax.set(ylabel="GiB", title=f"fits on {dev[0]['device']}? (green: yes)")
        ax.tick_params(axis="x", rotation=25)
        ax.legend()
        written.append(_save(fig, plot_dir / "device.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path
