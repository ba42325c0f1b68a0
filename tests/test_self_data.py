"""Self-data distillation (`recovery.data: self`, stages/self_data.py): the dense model rewrites
each recovery block after its prompt, deterministically, and a causal-LM job trains and distils
on that text."""

from __future__ import annotations

import json

import pytest
import torch
from test_causal_lm import lm_job, lm_workspace, tiny_lm

from runner.config import ConfigError, parse_config
from runner.job import run_job
from stages.self_data import self_generated
from stages.split import EncodedSplit


def blocks(rows: int = 5, width: int = 12) -> EncodedSplit:
    ids = torch.randint(4, 40, (rows, width), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[-1, 2:] = 0  # a last partial block, shorter than the prompt
    return EncodedSplit(ids * mask, mask, torch.arange(rows))


def test_greedy_self_data_is_the_models_own_continuation_after_each_prompt():
    model, split = tiny_lm(vocab=40), blocks()
    out = self_generated(model, split, prompt_tokens=4, temperature=0.0, seed=0, pad_id=0)
    assert out.input_ids.shape == split.input_ids.shape and torch.equal(out.labels, split.labels)
    assert torch.equal(out.input_ids[:, :4], split.input_ids[:, :4])
    assert torch.equal(out.input_ids[-1], split.input_ids[-1])  # too short: kept as it was
    assert torch.equal(out.attention_mask[:-1], torch.ones(4, 12, dtype=torch.long))
    with torch.no_grad():
        expected = model.generate(
            split.input_ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long),
            max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    assert torch.equal(out.input_ids[0], expected[0])
    assert not torch.equal(out.input_ids[:-1, 4:], split.input_ids[:-1, 4:])


def test_sampled_self_data_follows_the_seed_and_leaves_the_global_rng_alone():
    model, split = tiny_lm(vocab=40), blocks()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = self_generated(model, split, prompt_tokens=4, temperature=1.0, seed=7, pad_id=0)
    assert torch.equal(torch.rand(1), before)
    b = self_generated(model, split, prompt_tokens=4, temperature=1.0, seed=7, pad_id=0)
    c = self_generated(model, split, prompt_tokens=4, temperature=1.0, seed=8, pad_id=0)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)


def test_a_prompt_as_long_as_the_block_is_refused(tmp_path):
    raw = lm_job(tmp_path, {"seed": 0}) | {"recovery": {"data": "self", "prompt_tokens": 24}}
    with pytest.raises(ConfigError, match="prompt_tokens: 24 leaves no tokens to generate"):
        parse_config(raw)


@pytest.mark.slow
def test_a_causal_lm_job_recovers_on_its_own_text_with_kd(tmp_path):
    root = lm_workspace(tmp_path)
    raw = lm_job(root) | {"recovery": {"data": "self", "prompt_tokens": 6, "tokens": 3 * 4 * 24}}
    raw |= {"sia": {"enabled": False}, "output": {"plots": False, "progress": False}}
    raw["evaluation"] |= {"choice_tasks": [], "stage_choice_items": 0}
    (report,) = run_job(parse_config(raw), root / "out", log=lambda m: None).values()
    assert report["final"]["params"] < report["final"]["dense_params"]
    events = [json.loads(x) for x in (root / "out" / "events.jsonl").read_text().splitlines()]
    tokens = [e["tokens"] for e in events if e["event"] == "recover_start"]
    assert len(tokens) == 3 and sum(tokens) == 3 * 4 * 24
