"""A job's parameters per layer, pruned and dense, and the picture of the pruned layout.

The per-layer parameter counts come from the checkpoint's config ("pruning" layout section) and the
source model's dense shape, both built on the meta device: exact counts, no weights read.
"""

from __future__ import annotations

import copy
from pathlib import Path

import transformers
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from transformers import AutoConfig

from runner.demo_models import DEMO_MODELS
from runner.report.figures import png_bytes
from runner.report.model import Report
from stages.arch import LayerLayout, get_adapter
from stages.checkpoint import build_on_meta


# ----------------------------------------------------------------------------- layer breakdown
def _build_meta(config, layouts=None):
    """The architecture as parameter-less meta tensors (shapes only), optionally resized."""
    if not getattr(config, "architectures", None):
        config = copy.deepcopy(config)
        config.architectures = ["AutoModel"]
    cls = getattr(transformers, config.architectures[0])
    model = build_on_meta(config, cls=cls, layouts=layouts)
    model.tie_weights()  # a tied LM head is the embedding, not another vocab x hidden to count
    return model


def _count(model) -> dict:
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
    """The source model's dense shape, for checkpoints that do not record it (pruning.dense_layout,
    written since the built-in SmolLM2 left this column empty): built-in demo spec, or the source
    checkpoint's config."""
    if source in DEMO_MODELS:
        s = DEMO_MODELS[source]
        return _build_meta(config, [LayerLayout(s.heads, s.kv_heads, s.intermediate)] * s.layers)
    if source and (Path(source) / "config.json").is_file():
        src = AutoConfig.from_pretrained(source)
        src.architectures, src.num_labels = config.architectures, config.num_labels
        return _build_meta(src)
    return None


def layer_breakdown(job_dir: str | Path) -> dict | None:
    """Params per layer (attention / MLP / norms) + embeddings, pruned and dense; None if unknown."""
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
        recorded = [LayerLayout(**x) for x in pruning.get("dense_layout") or []]
        dense = (
            _build_meta(config, recorded)
            if recorded
            else _dense_model(config, pruning.get("source_model"))
        )
        result["dense"] = _count(dense) if dense is not None else None
    except Exception:  # noqa: BLE001 - the dense picture is a bonus; the pruned one stands alone
        pass
    return result


# ----------------------------------------------------------------------------- layout figure
def _origins(report: Report, n: int) -> list[int]:
    """Original index of each kept layer (the last stage's record), identity when unknown."""
    origin = report.stages[-1].layer_origin if report.stages else []
    return list(origin) if len(origin) == n else list(range(n))


def layout_figure(report: Report, bd: dict) -> bytes:
    return png_bytes(layout_plot(report, bd))


def layout_plot(report: Report, bd: dict) -> Figure:
    """Three panels over the original layer index (removed layers marked): parameters per layer
    over the dense outline; attention heads kept (query and KV heads: single digits, so their
    own axis); FFN channels kept (hundreds to thousands). Dense counts are dashed outlines."""
    pruned, dense = bd["pruned"], bd["dense"]
    origins = _origins(report, len(pruned["layers"]))
    n = len(dense["layers"]) if dense else max(origins) + 1
    fig = Figure(figsize=(9, 8))
    ax, heads_ax, ffn_ax = fig.subplots(3, 1, sharex=True, height_ratios=(1.3, 1, 1))
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
    every = pruned["layouts"] + (dense["layouts"] if dense else [])
    heads = [("num_heads", "query heads", "tab:purple")]
    if any(x["num_kv_heads"] != x["num_heads"] for x in every):  # MHA: KV heads = query heads
        heads.append(("num_kv_heads", "KV heads", "tab:orange"))
    _kept_bars(heads_ax, heads, origins, pruned["layouts"], dense, n)
    heads_ax.set_ylabel("attention heads")
    heads_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _kept_bars(ffn_ax, [("intermediate_size", "FFN channels", "tab:green")], origins,
               pruned["layouts"], dense, n)  # fmt: skip
    ffn_ax.set_ylabel("FFN channels")
    ffn_ax.set_xlabel("layer")
    ffn_ax.set_xticks(range(n))
    return fig


def _kept_bars(ax, units, origins: list[int], layouts: list[dict], dense, n: int) -> None:
    """Kept count of each unit kind per layer, side by side, over dashed dense outlines."""
    width = 0.8 / len(units)
    for k, (key, label, color) in enumerate(units):
        offset = (k - (len(units) - 1) / 2) * width
        if dense:
            full = [lay[key] for lay in dense["layouts"]]
            ax.bar([i + offset for i in range(n)], full, width, color="none", edgecolor=color,
                   ls="--")  # fmt: skip
        kept = [lay[key] for lay in layouts]
        ax.bar([o + offset for o in origins], kept, width, color=color, alpha=0.8, label=label)
    ax.legend(fontsize=7, title="dashed: dense" if dense else None, title_fontsize=7)
