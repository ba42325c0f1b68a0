"""Pruned causal LMs generate: uneven per-layer cuts of tiny Llama / Qwen2 / Mistral / Phi-3 / GPT-2,
saved and reloaded with load_pruned, generate greedily batched with left padding exactly as row by
row, with the KV cache exactly as without it; uniform cuts also load with plain from_pretrained."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    prune_uniformly,
    prune_units,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_phi3,
    tiny_qwen2,
    tiny_tokenizer,
)
from transformers import (
    AutoModelForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
)

from stages.arch import get_adapter
from stages.checkpoint import load_pruned, save_checkpoint

FAMILIES = {
    "llama": lambda: tiny_llama(LlamaForCausalLM),
    "qwen2": lambda: tiny_qwen2(Qwen2ForCausalLM),
    "mistral": lambda: tiny_mistral(MistralForCausalLM),
    "phi3": lambda: tiny_phi3(Phi3ForCausalLM),
    "gpt2": lambda: tiny_gpt2(GPT2LMHeadModel),
}
PROMPTS = [[5, 9, 13, 7, 21, 4], [30, 8, 6], [11, 12]]  # three lengths: left padding differs
NEW_TOKENS = 6


def uneven(model):
    """Different heads / KV groups and FFN widths in every layer, one layer dropped."""
    adapter = get_adapter(model)
    units = adapter.attn_units(model, 0)
    attn = {0: list(range(units)), 1: [units - 1], 2: list(range(max(1, units - 1)))}
    width = adapter.mlp_units(model, 0)
    mlp = {0: list(range(0, width, 2)), 1: list(range(width - 5)), 2: list(range(7, width))}
    prune_units(adapter, model, attn, mlp)
    adapter.remove_layers(model, [1])
    return model


def greedy(model, rows: list[list[int]], *, pad: int = 0, use_cache: bool = True):
    """Greedy continuation of left-padded rows; returns only the new tokens per row."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
            use_cache=use_cache, pad_token_id=pad,
        )  # fmt: skip
    eos = model.generation_config.eos_token_id
    return [_until_eos(row, eos) for row in out[:, width:].tolist()]


def _until_eos(tokens: list[int], eos) -> list[int]:
    """A finished row is padded in a batch but simply ends alone: compare up to its EOS."""
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("family", list(FAMILIES))
def test_uneven_causal_lm_generates_the_same_batched_and_cached(family, tmp_path):
    model = uneven(FAMILIES[family]().eval())
    layouts = get_adapter(model).layout(model)
    assert len(set(layouts)) > 1  # really per-layer shapes
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt")
    loaded = load_pruned(tmp_path / "ckpt")
    assert type(loaded) is type(model) and get_adapter(loaded).layout(loaded) == layouts
    assert (tmp_path / "ckpt" / "generation_config.json").is_file()
    batched = greedy(loaded, PROMPTS)
    one_by_one = [greedy(loaded, [p])[0] for p in PROMPTS]
    assert batched == one_by_one
    assert greedy(loaded, PROMPTS, use_cache=False) == batched
    assert greedy(model, PROMPTS) == batched  # the reload is the model that was cut


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_uniform_causal_lm_loads_with_plain_from_pretrained(family, tmp_path):
    model = prune_uniformly(FAMILIES[family]().eval(), heads=True)
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt", require_uniform=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert greedy(plain, PROMPTS) == greedy(model, PROMPTS)
