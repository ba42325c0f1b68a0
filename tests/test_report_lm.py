"""The causal-LM job report: perplexity per stage (log scale, per domain, dense as a reference
line), heads and FFN channels on their own axes, and the dense column of "Parameters per layer"
filled from the layout the checkpoint records (tests/test_causal_lm.py renders a real job's)."""

from __future__ import annotations

import math

import pytest
from test_report_html import STAGES, fake_report
from tiny_models import tiny_llama
from transformers import LlamaForCausalLM

from runner.report.figures import perplexity_stages_plot
from runner.report.layout import layer_breakdown, layout_plot
from runner.report.model import Report
from stages.arch import get_adapter
from stages.checkpoint import save_checkpoint

DOMAINS = {"docs": (12.0, 300), "code": (30.0, 100)}  # dense validation perplexity, tokens


def lm_report(*, per_domain: bool = True) -> Report:
    raw = fake_report("smol")
    for i, stage in enumerate(raw["stages"]):
        stage["perplexity"] = 20.0 + i
        if per_domain:
            stage["perplexity_by_domain"] = {d: ppl * (1.5 + i) for d, (ppl, _) in DOMAINS.items()}
    for key in ("macro_f1", "heldout_accuracy", "dense_heldout_accuracy", "confusion"):
        del raw["final"][key]  # a classifier's figures: a causal LM reports none of them
    raw["final"] |= {"lm_perplexity": 25.0, "dense_lm_perplexity": 15.0}
    if per_domain:
        raw["final"]["validation_perplexity_by_domain"] = {
            d: {"pruned": 2 * ppl, "dense": ppl, "tokens": n} for d, (ppl, n) in DOMAINS.items()
        }
    return Report.model_validate(raw)


def visible(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_perplexity_per_stage_one_log_panel_per_domain_and_all_together():
    fig = perplexity_stages_plot(lm_report())
    axes = visible(fig)
    assert [ax.get_title() for ax in axes] == ["docs", "code", "all domains"]
    assert all(ax.get_yscale() == "log" for ax in axes)
    docs, code, together = axes
    (line, dense) = docs.get_lines()
    assert list(line.get_ydata()) == [12.0 * (1.5 + i) for i in range(len(STAGES))] + [24.0]
    assert dense.get_linestyle() == "--" and list(dense.get_ydata()) == [12.0, 12.0]
    assert list(code.get_lines()[1].get_ydata()) == [30.0, 30.0]
    pooled = math.exp((300 * math.log(12.0) + 100 * math.log(30.0)) / 400)
    assert together.get_lines()[1].get_ydata()[0] == pytest.approx(pooled)
    assert together.get_lines()[0].get_ydata()[-1] == pytest.approx(2 * pooled)
    labels = [t.get_text() for t in docs.get_xticklabels()]
    assert labels[0] == "layers (0.9k)" and labels[-1] == "final export (0.5k)"


def test_an_older_report_gets_one_panel_with_the_dense_test_line_named_so():
    (ax,) = visible(perplexity_stages_plot(lm_report(per_domain=False)))
    line, dense = ax.get_lines()
    assert list(line.get_ydata()) == [20.0 + i for i in range(len(STAGES))] + [25.0]
    assert dense.get_label() == "dense, test 15.00" and ax.get_yscale() == "log"


def test_heads_and_ffn_channels_have_their_own_axes_and_the_dense_column_is_filled(tmp_path):
    model = tiny_llama(LlamaForCausalLM, intermediate_size=1536)
    dense_layout = [vars(x) for x in get_adapter(model).layout(model)]
    adapter = get_adapter(model)
    adapter.prune_attention(model, 0, [0])
    adapter.prune_mlp(model, 1, list(range(1000)))
    adapter.remove_layers(model, [2])
    save_checkpoint(
        model, None, tmp_path / "checkpoint",
        metadata={"source_model": "smollm2-135m", "dense_layout": dense_layout},
    )  # fmt: skip
    bd = layer_breakdown(tmp_path)
    assert bd["dense"] is not None and len(bd["dense"]["layers"]) == 3  # not from source_model
    assert [x["intermediate_size"] for x in bd["dense"]["layouts"]] == [1536] * 3
    report = lm_report()
    report.stages[-1].layer_origin = [0, 1]
    params, heads, ffn = layout_plot(report, bd).axes
    assert heads.get_ylabel() == "attention heads" and ffn.get_ylabel() == "FFN channels"
    assert heads.get_ylim()[1] < 10 < 1000 < ffn.get_ylim()[1]
    kept = sorted(round(p.get_height()) for p in heads.patches if p.get_linestyle() != "--")
    assert kept == [1, 2, 2, 4]  # query heads 2 / 4 and KV heads 1 / 2 of the two kept layers
