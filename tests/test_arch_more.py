"""More architecture adapters (OPT, GPT-NeoX, Qwen3, Phi-3, RoBERTa/XLM-R, DistilBERT).

Each family must pass what test_arch / test_checkpoint ask of the first ones: slicing equals
zero-masking (padding mask, eager and sdpa), layer removal equals skipping (and cached
generation stays right), per-layer checkpoints round-trip, uniform ones load with plain
transformers where the config can say so, and the LoRA target names wrap and merge with peft.
"""

from __future__ import annotations

import copy
import json
import pickle

import gguf
import pytest
import torch
from tiny_models import (
    padded_batch,
    prune_uniformly,
    prune_units,
    tiny_bert,
    tiny_distilbert,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_neox,
    tiny_opt,
    tiny_phi3,
    tiny_qwen2,
    tiny_qwen3,
    tiny_roberta,
    tiny_xlm_roberta,
)
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    GPTNeoXForCausalLM,
    OPTForCausalLM,
    Phi3ForCausalLM,
    Qwen3ForCausalLM,
)

from stages.arch import (
    SUPPORTED_MODEL_TYPES,
    LayerLayout,
    find_adapter,
    get_adapter,
    model_types_where,
)
from stages.arch.phi3 import LayerConfigView
from stages.checkpoint import CheckpointError, load_pruned, save_checkpoint
from stages.masking import skip_layers, unit_masks

# family: (builder, padding side, causal LM class or None, GQA?)
FAMILIES = {
    "opt": (tiny_opt, "left", OPTForCausalLM, False),
    "gpt_neox": (tiny_neox, "left", GPTNeoXForCausalLM, False),
    "qwen3": (tiny_qwen3, "left", Qwen3ForCausalLM, True),
    "phi3": (tiny_phi3, "left", Phi3ForCausalLM, True),
    "roberta": (tiny_roberta, "right", None, False),
    "xlm-roberta": (tiny_xlm_roberta, "right", None, False),
    "distilbert": (tiny_distilbert, "right", None, False),
}
CAUSAL = [name for name, spec in FAMILIES.items() if spec[2] is not None]
DISTINCT = [name for name in FAMILIES if name != "xlm-roberta"]  # XLM-R runs RoBERTa's code
ENCODERS = [name for name, spec in FAMILIES.items() if spec[2] is None]


def grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    return param.grad


def build(family: str, **kwargs):
    return FAMILIES[family][0](**kwargs)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(model, side: str = "right") -> torch.Tensor:
    ids, mask = padded_batch(side=side)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _heterogeneous_plan(adapter, model):
    units = adapter.attn_units(model, 0)  # 4 heads (MHA) or 2 KV groups (GQA)
    attn_keep = {0: list(range(1, units)), 2: [units - 1]}
    mlp_keep = {1: list(range(0, 48, 3)), 2: list(range(10, 40))}
    return attn_keep, mlp_keep


def _masks(sizes: dict[int, int], keep: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    masks = {}
    for i, kept in keep.items():
        masks[i] = torch.zeros(sizes[i])
        masks[i][kept] = 1.0
    return masks


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_slicing_equals_zero_masking(family, impl):
    model = build(family, attn_implementation=impl)
    side, gqa = FAMILIES[family][1], FAMILIES[family][3]
    adapter = get_adapter(model)
    attn_keep, mlp_keep = _heterogeneous_plan(adapter, model)
    attn = _masks({i: adapter.attn_units(model, i) for i in attn_keep}, attn_keep)
    mlp = _masks({i: adapter.mlp_units(model, i) for i in mlp_keep}, mlp_keep)
    dense = run(model, side)
    with unit_masks(model, adapter, attn=attn, mlp=mlp):
        masked = run(model, side)
    before = n_params(model)
    expected_drop = prune_units(adapter, model, attn_keep, mlp_keep)
    assert (dense - masked).abs().max() > 1e-3  # the masked units mattered
    torch.testing.assert_close(run(model, side), masked, atol=1e-5, rtol=0)
    assert before - n_params(model) == expected_drop
    per_unit = 2 if gqa else 1
    assert adapter.layout(model) == [
        LayerLayout(4 - per_unit, (4 - per_unit) // per_unit, 48),
        LayerLayout(4, 4 // per_unit, 16),
        LayerLayout(per_unit, 1, 30),
    ]


@pytest.mark.parametrize("family", DISTINCT)
def test_unit_weights_follow_the_slicing(family):
    """Row u of the unit weights/grads is exactly what pruning keeps for unit u."""
    model = build(family)
    adapter = get_adapter(model)
    attn_before = adapter.attn_unit_weights(model, 1)
    mlp_before = adapter.mlp_unit_weights(model, 1)
    ids, mask = padded_batch(side=FAMILIES[family][1])
    model(input_ids=ids, attention_mask=mask).logits.pow(2).sum().backward()
    assert [g.shape for g in adapter.attn_unit_tensors(model, 1, grad)] == [
        t.shape for t in attn_before
    ]
    assert all(g.abs().sum() > 0 for g in adapter.mlp_unit_tensors(model, 1, grad))
    adapter.prune_attention(model, 1, [1])
    adapter.prune_mlp(model, 1, [5, 7])
    for old, new in zip(attn_before, adapter.attn_unit_weights(model, 1), strict=True):
        torch.testing.assert_close(new, old[[1]], atol=0, rtol=0)
    for old, new in zip(mlp_before, adapter.mlp_unit_weights(model, 1), strict=True):
        torch.testing.assert_close(new, old[[5, 7]], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("family", "impl"), [(f, "sdpa") for f in DISTINCT] + [("qwen3", "eager"), ("opt", "eager")]
)
def test_remove_layers_equals_skip_layers(family, impl):
    model = build(family, attn_implementation=impl)
    side = FAMILIES[family][1]
    adapter = get_adapter(model)
    dense = run(model, side)
    with skip_layers(model, adapter, [0]):  # layer 0 is Qwen3's only full-attention layer
        skipped = run(model, side)
    cost, before = adapter.layer_cost(model, 0), n_params(model)
    adapter.remove_layers(model, [0])
    assert (dense - skipped).abs().max() > 1e-3
    torch.testing.assert_close(run(model, side), skipped, atol=1e-5, rtol=0)
    assert before - n_params(model) == cost
    assert model.config.num_hidden_layers == 2 and len(adapter.layers(model)) == 2
    idx = {m.layer_idx for m in adapter.layers(model).modules() if hasattr(m, "layer_idx")}
    assert idx == ({0, 1} if family != "distilbert" else set())  # renumbered (none in DistilBERT)
    if family == "qwen3":
        assert model.config.layer_types == ["sliding_attention", "sliding_attention"]


def _greedy(model, use_cache: bool) -> torch.Tensor:
    ids, mask = padded_batch(side="left", seq_len=7)
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )


@pytest.mark.parametrize("family", CAUSAL)
def test_cached_generation_after_layer_and_head_pruning(family):
    builder, _, cls, _ = FAMILIES[family]
    model = builder(cls, attn_implementation="sdpa")
    adapter = get_adapter(model)
    original = _greedy(model, use_cache=True)
    adapter.remove_layers(model, [1])
    assert torch.equal(_greedy(model, True), _greedy(model, False))
    adapter.prune_attention(model, 0, [0])
    adapter.prune_mlp(model, 1, list(range(20)))
    after = _greedy(model, use_cache=True)
    assert torch.equal(after, _greedy(model, use_cache=False))
    assert not torch.equal(original, after)  # pruning changed the model


def _heterogeneous(model):
    adapter = get_adapter(model)
    adapter.prune_attention(model, 0, [adapter.attn_units(model, 0) - 1])
    adapter.prune_mlp(model, 1, list(range(0, 48, 2)))
    adapter.prune_mlp(model, 2, [3, 9, 27])
    adapter.remove_layers(model, [1])
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_heterogeneous_checkpoint_round_trips(family, tmp_path):
    side = FAMILIES[family][1]
    model = _heterogeneous(build(family))
    path = save_checkpoint(model, None, tmp_path / "ckpt")
    loaded = load_pruned(path, attn_implementation="eager")
    assert get_adapter(loaded).layout(loaded) == get_adapter(model).layout(model)
    torch.testing.assert_close(run(loaded, side), run(model, side), atol=1e-6, rtol=0)
    pruning = json.loads((path / "config.json").read_text())["pruning"]
    assert pruning["vanilla_loadable"] is False and len(pruning["layout"]) == 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_uniform_checkpoint_loads_with_plain_transformers(family, tmp_path):
    """FFN + depth always; heads too where the config has an explicit head_dim (GQA here)."""
    side, gqa = FAMILIES[family][1], FAMILIES[family][3]
    model = prune_uniformly(build(family), heads=gqa)
    path = save_checkpoint(model, None, tmp_path / "ckpt", require_uniform=True)
    plain = AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager"
    ).eval()
    assert type(plain) is type(model)
    assert get_adapter(plain).layout(plain) == get_adapter(model).layout(model)
    torch.testing.assert_close(run(plain, side), run(model, side), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", [f for f in DISTINCT if not FAMILIES[f][3]])
def test_uniform_head_pruning_is_not_vanilla_for_mha_families(family, tmp_path):
    model = build(family)
    adapter = get_adapter(model)
    for i in range(3):
        adapter.prune_attention(model, i, [0, 2])
    config = copy.deepcopy(model.config)
    assert not adapter.write_uniform_config(config, adapter.layout(model))
    assert config.to_dict() == model.config.to_dict()  # untouched on False
    with pytest.raises(CheckpointError, match="not expressible"):
        save_checkpoint(model, None, tmp_path / "ckpt", require_uniform=True)
    loaded = load_pruned(save_checkpoint(model, None, tmp_path / "ckpt"))
    side = FAMILIES[family][1]
    torch.testing.assert_close(run(loaded, side), run(model, side), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", DISTINCT)
def test_lora_targets_wrap_and_merge(family):
    from peft import LoraConfig, get_peft_model

    model = build(family)
    adapter = get_adapter(model)
    names = [name for name, _ in model.named_modules()]
    for target in adapter.lora_target_modules() + adapter.classifier_module_names():
        assert any(n == target or n.endswith("." + target) for n in names), target
    config = LoraConfig(
        r=2,
        target_modules=adapter.lora_target_modules(),
        modules_to_save=adapter.classifier_module_names(),
    )
    wrapped = get_peft_model(model, config)
    lora_names = {n.split(".lora_A")[0] for n, _ in wrapped.named_parameters() if ".lora_A" in n}
    for target in adapter.lora_target_modules():  # every target is wrapped in every layer
        assert sum(n.endswith("." + target) for n in lora_names) in (3, 6), target
    saved = [n for n, _ in wrapped.named_modules() if n.endswith("modules_to_save")]
    assert len(saved) == len(adapter.classifier_module_names())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    side = FAMILIES[family][1]
    tuned = run(wrapped, side)
    merged = wrapped.merge_and_unload()
    torch.testing.assert_close(run(merged, side), tuned, atol=1e-5, rtol=0)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    adapter.prune_attention(merged, 0, [0])  # merged weights are plain Linear again


def test_registry_and_encoder_family():
    expected = {"opt", "gpt_neox", "qwen3", "phi3", "roberta", "xlm-roberta", "distilbert"}
    assert expected <= set(SUPPORTED_MODEL_TYPES)
    for family in FAMILIES:
        model = build(family)
        assert get_adapter(model.config).model_types == get_adapter(model).model_types
        assert model.config.model_type in SUPPORTED_MODEL_TYPES
    for family in ENCODERS:  # capabilities, not family names, mark encoder-only models
        adapter = get_adapter(build(family))
        assert not adapter.is_decoder and not adapter.conv1d_weights
    for family in set(FAMILIES) - set(ENCODERS):
        assert get_adapter(build(family)).is_decoder
    assert get_adapter(tiny_gpt2()).conv1d_weights and get_adapter(tiny_gpt2()).fused_qkv_cache
    assert (
        get_adapter(tiny_opt()).mlp_kind == "relu" and get_adapter(tiny_phi3()).mlp_kind == "swiglu"
    )


def test_phi3_layer_config_view_survives_copies():
    """Pruned Phi-3 layers read num_attention_heads from a per-layer view of the shared config."""
    model = _heterogeneous(build("phi3", attn_implementation="eager"))
    layers = get_adapter(model).layers(model)
    assert isinstance(layers[0].self_attn.config, LayerConfigView)
    assert layers[0].self_attn.config.num_attention_heads == 2
    assert layers[1].self_attn.config is model.config  # unpruned heads: the shared config
    expected = run(model, "left")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(run(clone, "left"), expected, atol=0, rtol=0)
        view = get_adapter(clone).layers(clone)[0].self_attn.config
        assert view._base is clone.config  # still shared with the clone's own config
    model.set_attn_implementation("sdpa")
    assert layers[0].self_attn.config._attn_implementation == "sdpa"
    torch.testing.assert_close(run(model, "left"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("family", "overrides", "flag"),
    [
        ("opt", {"enable_bias": False}, "enable_bias"),
        ("gpt_neox", {"attention_bias": False}, "attention_bias"),
        ("qwen3", {}, "attention_bias"),
    ],
)
def test_bias_compensation_adds_loadable_zero_biases(family, overrides, flag, tmp_path):
    model = build(family, **overrides)
    adapter = get_adapter(model)
    out_proj = adapter.attn_out_proj(adapter.layers(model)[0])
    assert out_proj.bias is None
    before = run(model, "left")
    adapter.ensure_out_proj_bias(model, "heads")
    assert out_proj.bias is not None and getattr(model.config, flag) is True
    torch.testing.assert_close(run(model, "left"), before, atol=0, rtol=0)
    with torch.no_grad():
        out_proj.bias.add_(0.5)  # what FLAP compensation does
    path = save_checkpoint(model, None, tmp_path / "ckpt", require_uniform=True)
    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
    torch.testing.assert_close(run(plain, "left"), run(model, "left"), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "granularity"), [("qwen3", "channels"), ("phi3", "heads")])
def test_bias_compensation_refused_where_config_cannot_express_it(family, granularity):
    model = build(family)
    with pytest.raises(ValueError, match="bias"):
        get_adapter(model).ensure_out_proj_bias(model, granularity)
    assert all(p.dim() != 1 or "norm" in n for n, p in model.named_parameters())  # no biases


ALL_BUILDERS = {
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    **{family: spec[0] for family, spec in FAMILIES.items()},
}


def test_every_supported_model_type_has_a_tiny_model_here():
    assert set(ALL_BUILDERS) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(ALL_BUILDERS))
def test_capabilities_hold_for_the_model_they_describe(model_type):
    """What code outside the adapters asks of them (streamable, pooler, GGUF architecture) is
    true of the model: a streamed family is a decoder, `has_pooler` is what AutoModel builds,
    a GGUF architecture is one llama.cpp knows, named only for the adapter's own model types."""
    model = ALL_BUILDERS[model_type]()
    adapter = get_adapter(model)
    assert not adapter.streamable or adapter.is_decoder
    bare = AutoModel.from_config(model.config)
    assert (getattr(bare, "pooler", None) is not None) == adapter.has_pooler
    assert set(adapter.gguf_architectures) <= set(adapter.model_types)
    assert set(adapter.gguf_architectures.values()) <= set(gguf.MODEL_ARCH_NAMES.values())
    llama_shaped = model_type in ("llama", "mistral", "qwen2")  # the GGUF exporter's tensor names
    assert (adapter.gguf_architecture(model_type) is not None) == llama_shaped


def test_registry_lookups_by_model_type():
    assert find_adapter("qwen2").family == "llama" and find_adapter("nope") is None
    assert find_adapter(None) is None
    streamable = model_types_where(lambda adapter, _: adapter.streamable)
    assert streamable == ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "opt", "gpt_neox")
    assert model_types_where(lambda a, t: a.gguf_architecture(t)) == ("llama", "mistral", "qwen2")


def test_sliding_window_is_read_as_transformers_reads_it():
    """Mistral has no switch (a set window is used); Qwen2 / Qwen3 use it only when switched on."""
    llama = find_adapter("mistral")
    assert llama.uses_sliding_window({"model_type": "mistral", "sliding_window": 8})
    assert not llama.uses_sliding_window({"model_type": "qwen2", "sliding_window": 8})
    assert llama.uses_sliding_window({"model_type": "qwen2", "use_sliding_window": True})
    assert not find_adapter("qwen3").uses_sliding_window({"model_type": "qwen3"})
    assert not find_adapter("gpt2").uses_sliding_window({"model_type": "gpt2"})
