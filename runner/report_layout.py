"""A job's parameters per layer, pruned and dense, and the picture of the pruned layout.

The per-layer parameter counts come from the checkpoint's config ("pruning" layout section) and the
source model's dense shape, both built on the meta device: exact counts, no weights read.
"""

from __future__ import annotations

import copy
from pathlib import Path

import transformers
from matplotlib.figure import Figure
from transformers import AutoConfig

from runner.demo_models import DEMO_MODELS
from runner.report_figures import png_bytes
from runner.report_model import Report
from stages.arch import LayerLayout, get_adapter
from stages.checkpoint import build_on_meta


# ----------------------------------------------------------------------------- layer breakdown
def _build_meta(config, layouts=None):
    """The architecture as parameter-less meta tensors (shapes only), optionally resized."""
    if not getattr(config, "architectures", None):
        config = copy.deepcopy(config)
        config.architectures = ["AutoModel"]
    cls = getattr(transformers, config.architectures[0])
    return build_on_meta(config, cls=cls, layouts=layouts)


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
    """The source model's dense shape: built-in demo spec, or the source checkpoint's config."""
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
        dense = _dense_model(config, pruning.get("source_model"))
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
    """Parameters per layer at its original index (removed layers marked) over the dense outline,
    and the share of query heads / KV heads / FFN channels each layer kept."""
    pruned, dense = bd["pruned"], bd["dense"]
    origins = _origins(report, len(pruned["layers"]))
    n = len(dense["layers"]) if dense else max(origins) + 1
    fig = Figure(figsize=(9, 6))
    ax, ax2 = fig.subplots(2, 1, sharex=True)
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
    return png_bytes(fig)
