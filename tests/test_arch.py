"""Architecture adapters: physical slicing equals zero-masking, layer removal equals skipping.

Every family (GPT-2, BERT, Llama, Qwen2, Mistral) with eager and sdpa attention and a padding
mask, on tiny seeded models built from configs.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from tiny_models import (
    padded_batch,
    prune_units,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
)
from transformers import (
    BertModel,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    T5Config,
)

from stages.arch import SUPPORTED_MODEL_TYPES, LayerLayout, UnsupportedArchitecture, get_adapter
from stages.masking import capture_layer_io, skip_layers, unit_masks

FAMILIES = {
    "gpt2": (tiny_gpt2, "right"),
    "bert": (tiny_bert, "right"),
    "llama": (tiny_llama, "left"),
    "qwen2": (tiny_qwen2, "left"),
    "mistral": (tiny_mistral, "left"),
}
IMPLS = ("eager", "sdpa")
BASE_CLASSES = {"gpt2": GPT2Model, "bert": BertModel, "llama": LlamaModel}
CAUSAL = {
    "gpt2": (tiny_gpt2, GPT2LMHeadModel),
    "llama": (tiny_llama, LlamaForCausalLM),
    "qwen2": (tiny_qwen2, Qwen2ForCausalLM),
    "mistral": (tiny_mistral, MistralForCausalLM),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _plan(adapter, model):
    """A heterogeneous plan: different heads per layer, different FFN channels per layer."""
    units = [adapter.attn_units(model, i) for i in range(3)]
    attn_keep = {0: list(range(1, units[0])), 2: [units[2] - 1]}
    mlp_keep = {1: list(range(0, 48, 3)), 2: list(range(10, 40))}
    return attn_keep, mlp_keep


def _masks(adapter, model, attn_keep, mlp_keep):
    attn = {}
    for i, keep in attn_keep.items():
        attn[i] = torch.zeros(adapter.attn_units(model, i))
        attn[i][keep] = 1.0
    mlp = {}
    for i, keep in mlp_keep.items():
        mlp[i] = torch.zeros(adapter.mlp_units(model, i))
        mlp[i][keep] = 1.0
    return attn, mlp


def _slicing_matches_masking(model, side):
    adapter = get_adapter(model)
    ids, mask = padded_batch(side=side)
    dense = run(model, ids, mask)
    attn_keep, mlp_keep = _plan(adapter, model)
    attn, mlp = _masks(adapter, model, attn_keep, mlp_keep)
    with unit_masks(model, adapter, attn=attn, mlp=mlp):
        masked = run(model, ids, mask)
    before = n_params(model)
    expected_drop = prune_units(adapter, model, attn_keep, mlp_keep)
    sliced = run(model, ids, mask)
    assert (dense - masked).abs().max() > 1e-3  # the masked units mattered
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=0)
    assert before - n_params(model) == expected_drop
    return adapter.layout(model)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_slicing_equals_zero_masking(family, impl):
    build, side = FAMILIES[family]
    model = build(attn_implementation=impl)
    per_unit = get_adapter(model).heads_per_unit(model)
    layouts = _slicing_matches_masking(model, side)
    assert layouts[0] != layouts[1] != layouts[2]  # heterogeneous per-layer layout
    heads0 = 4 - per_unit
    assert layouts[0].num_heads == heads0 and layouts[2].num_heads == per_unit
    assert [x.intermediate_size for x in layouts] == [48, 16, 30]


@pytest.mark.parametrize("family", list(BASE_CLASSES))
def test_slicing_works_on_base_models(family):
    build, side = FAMILIES[family]
    _slicing_matches_masking(build(BASE_CLASSES[family], attn_implementation="eager"), side)


@pytest.mark.parametrize("family", list(CAUSAL))
def test_slicing_works_on_causal_lms(family):
    build, cls = CAUSAL[family]
    _slicing_matches_masking(build(cls, attn_implementation="sdpa"), "left")


@pytest.mark.parametrize(
    ("family", "impl"), [(f, "sdpa") for f in FAMILIES] + [("llama", "eager"), ("qwen2", "eager")]
)
def test_remove_layers_equals_skip_layers(family, impl):
    build, side = FAMILIES[family]
    model = build(attn_implementation=impl)
    adapter = get_adapter(model)
    ids, mask = padded_batch(side=side)
    dense = run(model, ids, mask)
    with skip_layers(model, adapter, [0]):  # layer 0 is Qwen2's only full-attention layer
        skipped = run(model, ids, mask)
    cost = adapter.layer_cost(model, 0)
    before = n_params(model)
    adapter.remove_layers(model, [0])
    removed = run(model, ids, mask)
    assert (dense - skipped).abs().max() > 1e-3
    torch.testing.assert_close(removed, skipped, atol=1e-5, rtol=0)
    assert before - n_params(model) == cost
    assert model.config.num_hidden_layers == 2 and len(adapter.layers(model)) == 2
    idx = [
        m.layer_idx
        for layer in adapter.layers(model)
        for m in layer.modules()
        if hasattr(m, "layer_idx")
    ]
    assert sorted(set(idx)) == [0, 1]
    if family == "qwen2":
        assert model.config.layer_types == ["sliding_attention", "sliding_attention"]


def _greedy(model, ids, mask, use_cache):
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_cached_generation_after_layer_and_head_pruning(family):
    build, cls = CAUSAL[family]
    model = build(cls, attn_implementation="sdpa")
    adapter = get_adapter(model)
    ids, mask = padded_batch(side="left", seq_len=7)
    original = _greedy(model, ids, mask, use_cache=True)
    adapter.remove_layers(model, [1])
    after_layers = _greedy(model, ids, mask, use_cache=True)
    assert torch.equal(after_layers, _greedy(model, ids, mask, use_cache=False))
    adapter.prune_attention(model, 0, [0])
    adapter.prune_mlp(model, 1, list(range(20)))
    after_heads = _greedy(model, ids, mask, use_cache=True)
    assert torch.equal(after_heads, _greedy(model, ids, mask, use_cache=False))
    assert not torch.equal(original, after_heads)  # pruning changed the model


def test_unsupported_architecture_names_supported_types():
    with pytest.raises(UnsupportedArchitecture) as err:
        get_adapter(T5Config())
    message = str(err.value)
    assert "'t5'" in message
    assert all(t in message for t in SUPPORTED_MODEL_TYPES)
    assert isinstance(err.value, ValueError)
    assert {"bert", "gpt2", "llama", "mistral", "qwen2"} <= set(SUPPORTED_MODEL_TYPES)


def test_prune_rejects_bad_keep_and_total_removal():
    model = tiny_llama()
    adapter = get_adapter(model)
    for keep, match in (
        ([], "empty"),
        ([0, 0], "duplicate"),
        ([2], "out of range"),
        ([-1], "out of range"),
    ):
        with pytest.raises(ValueError, match=match):
            adapter.prune_attention(model, 0, keep)
    with pytest.raises(ValueError, match="empty"):
        adapter.prune_mlp(model, 0, [])
    with pytest.raises(ValueError, match="all 3 layers"):
        adapter.remove_layers(model, [0, 1, 2])
    with pytest.raises(ValueError, match="duplicate"):
        adapter.remove_layers(model, [1, 1])
    assert adapter.layout(model) == [LayerLayout(4, 2, 48)] * 3  # nothing changed


def test_attention_kinds_and_units():
    for kv, kind, units in ((4, "mha", 4), (2, "gqa", 2), (1, "mqa", 1)):
        model = tiny_llama(num_kv_heads=kv)
        adapter = get_adapter(model)
        assert adapter.attention_kind(model.config) == kind
        assert adapter.attn_units(model, 0) == units
        assert adapter.heads_per_unit(model) == 4 // kv
    gpt2 = tiny_gpt2()
    assert get_adapter(gpt2).attention_kind(gpt2.config) == "mha"
    assert get_adapter(gpt2).mlp_kind == "gelu" and get_adapter(tiny_llama()).mlp_kind == "swiglu"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unit_weights_follow_the_slicing(family):
    """Row u of the unit weights is exactly what pruning keeps for unit u; grads read alike."""
    model = FAMILIES[family][0]()
    adapter = get_adapter(model)
    before = adapter.attn_unit_weights(model, 1)
    mlp_before = adapter.mlp_unit_weights(model, 1)
    assert all(t.shape[0] == adapter.attn_units(model, 1) for t in before)
    assert sum(t.shape[1] for t in before) == adapter.attn_unit_cost(model, 1)
    ids, mask = padded_batch()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    grads = adapter.mlp_unit_tensors(model, 1, lambda p: p.grad)
    assert [g.shape for g in grads] == [t.shape for t in mlp_before]
    assert any(g.abs().sum() > 0 for g in grads)
    adapter.prune_attention(model, 1, [1])
    adapter.prune_mlp(model, 1, [5, 7])
    for old, new in zip(before, adapter.attn_unit_weights(model, 1)):
        torch.testing.assert_close(new, old[[1]], atol=0, rtol=0)
    for old, new in zip(mlp_before, adapter.mlp_unit_weights(model, 1)):
        torch.testing.assert_close(new, old[[5, 7]], atol=0, rtol=0)


def test_out_proj_weight_is_an_out_in_view():
    model = tiny_gpt2()
    adapter = get_adapter(model)
    module = adapter.attn_out_proj(adapter.layers(model)[0])  # Conv1D, stored [in, out]
    weight = adapter.out_proj_weight(module)
    assert weight.shape == (32, 32) and weight.data_ptr() == module.weight.data_ptr()
    with torch.no_grad():
        weight[:, 3].zero_()
    assert module.weight[3].abs().sum() == 0


def test_write_uniform_config_only_when_vanilla_rebuilds_it():
    llama = tiny_llama()
    adapter = get_adapter(llama)
    config = llama.config
    assert adapter.write_uniform_config(config, [LayerLayout(2, 1, 20)] * 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    assert (config.intermediate_size, config.num_hidden_layers) == (20, 2)
    mha = tiny_llama(num_kv_heads=4).config
    assert not adapter.write_uniform_config(mha, [LayerLayout(3, 3, 48)] * 3)  # 32 % 3 heads
    assert not adapter.write_uniform_config(mha, [LayerLayout(4, 4, 48), LayerLayout(4, 4, 40)])
    assert (mha.num_attention_heads, mha.intermediate_size) == (4, 48)  # untouched on False
    gpt2 = tiny_gpt2().config
    assert not get_adapter(gpt2).write_uniform_config(gpt2, [LayerLayout(2, 2, 48)] * 3)
    assert get_adapter(gpt2).write_uniform_config(gpt2, [LayerLayout(4, 4, 24)] * 3)
    assert gpt2.n_inner == 24 and gpt2.n_head == 4


@pytest.mark.parametrize("family", ["gpt2", "bert", "qwen2"])
def test_resize_to_layout_on_meta(family):
    build = FAMILIES[family][0]
    model = build()
    adapter = get_adapter(model)
    per_unit = adapter.heads_per_unit(model)  # 1 for MHA, 2 for the tiny GQA Qwen2
    units_and_channels = ((1, 7), (4 // per_unit, 48), (2 // per_unit or 1, 3))
    layouts = [
        LayerLayout(units * per_unit, units, channels) for units, channels in units_and_channels
    ]
    with init_empty_weights(include_buffers=False):
        empty = type(model)(model.config)
    adapter.resize_to_layout(empty, layouts)
    assert adapter.layout(empty) == layouts
    assert all(p.device.type == "meta" for p in empty.parameters())
    with pytest.raises(ValueError, match="2 layouts for 3 layers"):
        adapter.resize_to_layout(empty, layouts[:2])


def test_masking_contexts_restore_the_model():
    model = tiny_llama()
    adapter = get_adapter(model)
    ids, mask = padded_batch(side="left")
    dense = run(model, ids, mask)
    with pytest.raises(RuntimeError, match="boom"):
        with skip_layers(model, adapter, [1]), unit_masks(model, adapter, mlp={0: torch.zeros(48)}):
            raise RuntimeError("boom")
    torch.testing.assert_close(run(model, ids, mask), dense, atol=0, rtol=0)
    with pytest.raises(ValueError, match="mask shape"):
        with unit_masks(model, adapter, attn={0: torch.ones(3)}):
            pass
    with capture_layer_io(model, adapter) as io:
        run(model, ids, mask)
    assert sorted(io) == [0, 1, 2]
    torch.testing.assert_close(io[0][1], io[1][0], atol=0, rtol=0)  # out of 0 is the input of 1
    with skip_layers(model, adapter, [1]), capture_layer_io(model, adapter) as io:
        run(model, ids, mask)
    torch.testing.assert_close(io[1][1], io[1][0], atol=0, rtol=0)


def test_unit_masks_give_taylor_gradients():
    model = tiny_bert()
    adapter = get_adapter(model)
    ids, mask = padded_batch()
    gate = torch.ones(4, requires_grad=True)
    with unit_masks(model, adapter, attn={1: gate}):
        model(input_ids=ids, attention_mask=mask).logits.pow(2).sum().backward()
    assert gate.grad is not None and gate.grad.shape == (4,) and gate.grad.abs().min() > 0


def test_stale_split_size_would_be_caught():
    """Sanity check of the equality test itself: GPT-2 reads split_size in its forward."""
    model = tiny_gpt2()
    adapter = get_adapter(model)
    adapter.prune_attention(model, 0, [0, 2])
    assert model.transformer.h[0].attn.split_size == 16
    model.transformer.h[0].attn.split_size = 32
    with pytest.raises((RuntimeError, ValueError)):  # q/k/v split no longer lines up
        run(model, *padded_batch())


def test_peft_wrapped_model_is_found_but_lora_layers_are_not_sliced():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    adapter = get_adapter(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=adapter.lora_target_modules()))
    assert get_adapter(wrapped).family == "llama" and len(adapter.layers(wrapped)) == 3
    assert adapter.layout(wrapped) == [LayerLayout(4, 2, 48)] * 3  # read through LoRA wrappers
    with pytest.raises(ValueError, match="merge LoRA"):
        adapter.prune_attention(wrapped, 0, [0])
    assert adapter.layout(wrapped) == [LayerLayout(4, 2, 48)] * 3  # refused before any slicing


def test_llama_bias_compensation_adds_loadable_zero_biases(tmp_path):
    import torch

    from stages.arch import get_adapter
    from stages.checkpoint import load_pruned, save_checkpoint

    model = tiny_llama()
    adapter = get_adapter(model)
    ids = torch.randint(3, 90, (2, 7))
    before = model(input_ids=ids).logits
    adapter.ensure_out_proj_bias(model, "heads")
    adapter.ensure_out_proj_bias(model, "channels")
    assert model.config.attention_bias and model.config.mlp_bias
    assert torch.allclose(model(input_ids=ids).logits, before)  # zero biases change nothing
    save_checkpoint(model, None, tmp_path / "ck")
    reloaded = load_pruned(tmp_path / "ck")
    assert torch.allclose(reloaded(input_ids=ids).logits, before, atol=1e-5)
