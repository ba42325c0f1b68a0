"""SIA measurements: exact on synthetic components, wired correctly on real tiny models."""

import random

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

from runner.config import SIAConfig
from stages.arch import get_adapter
from stages.objectives import get_objective
from stages.sia import additivity, combine, component_masks, run_sia, stability

CLASSIFY = get_objective("classification")

COUNTS = [6, 5, 4]
EFFECT = {
    (layer, c): 0.1 * (layer + 1) + 0.03 * c for layer, n in enumerate(COUNTS) for c in range(n)
}


def independent_loss(removed):
    """Loss of a model whose components contribute independently by construction."""
    return 1.0 + sum(EFFECT[c] for c in removed)


def interacting_loss(removed):
    """Same components, but removing two in one layer costs far more than the sum (redundancy)."""
    per_layer = {}
    for layer, c in removed:
        per_layer.setdefault(layer, []).append(EFFECT[(layer, c)])
    return 1.0 + sum(sum(v) * (3.0 if len(v) > 1 else 1.0) for v in per_layer.values())


def test_additivity_is_exactly_zero_for_independent_components():
    result = additivity(independent_loss, COUNTS, pairs=20, rng=random.Random(0))
    assert result["median"] == pytest.approx(0.0, abs=1e-12)
    assert result["p90"] == pytest.approx(0.0, abs=1e-12)


def test_additivity_detects_an_interaction():
    result = additivity(interacting_loss, COUNTS, pairs=20, rng=random.Random(0))
    assert result["median"] == pytest.approx(2.0, rel=1e-6)  # |3(a+b) - a - b| / (a+b)


def test_stability_is_perfect_when_scores_ignore_other_removals():
    def scores(removed):
        return dict(EFFECT)

    assert stability(scores, COUNTS, 0.3, random.Random(0))["spearman"] == pytest.approx(1.0)


def test_stability_drops_when_removal_reorders_scores():
    def scores(removed):
        flip = -1.0 if removed else 1.0
        return {c: flip * v for c, v in EFFECT.items()}

    assert stability(scores, COUNTS, 0.3, random.Random(0))["spearman"] < -0.9


def test_verdict_uses_the_threshold():
    good = {"heads": {"additivity": {"median": 0.1}, "stability": {"spearman": 0.9}}}
    bad = {"heads": {"additivity": {"median": 0.9}, "stability": {"spearman": 0.1}}}
    assert combine(good, 0.5)["satisfied"] and not combine(bad, 0.5)["satisfied"]
    assert combine(good, 0.5)["score"] == pytest.approx(0.1)


def test_query_head_masks_match_zeroing_o_proj_columns():
    model = tiny_llama(num_heads=4, num_kv_heads=2)
    adapter = get_adapter(model)
    ids = torch.randint(3, 90, (2, 9))
    mask = torch.ones(4)
    mask[1] = 0.0  # one query head inside KV group 0
    with torch.no_grad(), component_masks(model, adapter, "heads", {0: mask}):
        masked = model(input_ids=ids).logits
        o_proj = model.model.layers[0].self_attn.o_proj
        hd = adapter.head_dim(model)
    with torch.no_grad():
        o_proj.weight[:, hd : 2 * hd] = 0.0
        zeroed = model(input_ids=ids).logits
    assert torch.allclose(masked, zeroed, atol=1e-6)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_run_sia_on_a_real_model_reports_both_granularities(build):
    model = build()
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(3, 90, (4, 10), generator=g),
            "attention_mask": torch.ones(4, 10, dtype=torch.long),
            "labels": torch.randint(0, 3, (4,), generator=g),
        }
        for _ in range(2)
    ]
    before = [p.clone() for p in model.parameters()]
    result = run_sia(model, adapter, batches, SIAConfig(pairs=4), CLASSIFY, seed=0)
    assert set(result["details"]) == {"heads", "channels"}
    assert result["details"]["heads"]["components"] == sum(
        adapter.attn_units(model, i) * adapter.heads_per_unit(model)
        for i in range(len(adapter.layers(model)))
    )
    assert 0.0 <= result["score"] and isinstance(result["satisfied"], bool)
    assert all(
        torch.equal(a, b) for a, b in zip(before, model.parameters())
    )  # measurement changes nothing


@pytest.mark.slow
def test_sia_command_measures_the_model_the_job_prunes(tmp_path):
    """With finetune_steps, `cascade sia` fine-tunes first, exactly as the job does before its SIA check."""
    import json

    from conftest import tiny_job

    from runner.config import parse_config
    from runner.job import run_job
    from runner.sia_report import sia_for_config

    raw = tiny_job(models=[{"ref": "demo-tiny-gpt2", "finetune_steps": 3}])
    raw["stages"] = raw["stages"][:1]
    cfg = parse_config(raw)
    (standalone,) = sia_for_config(cfg, log=lambda m: None).values()
    run_job(cfg, tmp_path / "job", log=lambda m: None)
    events = [
        json.loads(line) for line in (tmp_path / "job" / "events.jsonl").read_text().splitlines()
    ]
    (in_job,) = [e for e in events if e["event"] == "sia"]
    assert standalone["score"] == pytest.approx(in_job["score"], rel=1e-6)
