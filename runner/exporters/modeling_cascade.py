"""Per-layer pruned Llama / Mistral / Qwen2 models for Hugging Face tools (`trust_remote_code=True`).

`cascade export CHECKPOINT --format hf --remote-code` copies this file, unchanged, into the exported
folder, and its config.json maps `auto_map` AutoConfig / AutoModelForCausalLM to the classes here
(the way DeciLM / Nemotron-NAS checkpoints ship their code). Plain transformers configs hold one
head count and one FFN width for all layers; a pruned model has its own per layer. So each class is
the family's own transformers class, built as usual from the dense-width config and then given
the per-layer shapes listed in `config.per_layer` (one {"num_heads", "num_kv_heads",
"intermediate_size"} per layer): q/k/v/o and gate/up/down are replaced by Linear modules of those
sizes (same dtype, device and bias), and `num_key_value_groups` follows. Forward, attention
kernels, KV cache and generation are the family's, untouched; the head size stays the dense one.

Only torch and transformers are imported: the file runs wherever the folder is loaded.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PER_LAYER_KEYS = ("num_heads", "num_kv_heads", "intermediate_size")


def _resized(linear: nn.Linear, *, out_features: int | None = None, in_features: int | None = None):
    """A Linear like `linear` (dtype, device, bias) with new sizes; the same one if they match."""
    out_features = linear.out_features if out_features is None else out_features
    in_features = linear.in_features if in_features is None else in_features
    if (out_features, in_features) == (linear.out_features, linear.in_features):
        return linear
    weight = linear.weight
    return nn.Linear(
        in_features,
        out_features,
        bias=linear.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )


def check_per_layer(config) -> list[dict]:
    """config.per_layer, validated against the layer count and the GQA rule (heads % kv == 0)."""
    per_layer = getattr(config, "per_layer", None)
    if not isinstance(per_layer, list) or len(per_layer) != config.num_hidden_layers:
        raise ValueError(
            f"config.per_layer must list one shape per layer ({config.num_hidden_layers}), "
            f"got {type(per_layer).__name__} of length {len(per_layer or [])}"
        )
    for i, shape in enumerate(per_layer):
        values = [shape.get(key) if isinstance(shape, dict) else None for key in PER_LAYER_KEYS]
        if not all(isinstance(v, int) and v >= 1 for v in values) or values[0] % values[1]:
            raise ValueError(f"config.per_layer[{i}] = {shape!r}: need {PER_LAYER_KEYS} >= 1")
    return per_layer


def resize_per_layer(model) -> None:
    """Give every decoder layer of `model` (a *ForCausalLM) the shapes of config.per_layer."""
    for layer, shape in zip(model.model.layers, check_per_layer(model.config)):
        attn, mlp = layer.self_attn, layer.mlp
        heads, kv_heads = shape["num_heads"], shape["num_kv_heads"]
        attn.q_proj = _resized(attn.q_proj, out_features=heads * attn.head_dim)
        attn.k_proj = _resized(attn.k_proj, out_features=kv_heads * attn.head_dim)
        attn.v_proj = _resized(attn.v_proj, out_features=kv_heads * attn.head_dim)
        attn.o_proj = _resized(attn.o_proj, in_features=heads * attn.head_dim)
        attn.num_key_value_groups = heads // kv_heads
        width = shape["intermediate_size"]
        mlp.gate_proj = _resized(mlp.gate_proj, out_features=width)
        mlp.up_proj = _resized(mlp.up_proj, out_features=width)
        mlp.down_proj = _resized(mlp.down_proj, in_features=width)
        mlp.intermediate_size = width


class CascadeLlamaConfig(LlamaConfig):
    """LlamaConfig; `per_layer` rides along as an extra field."""


class CascadeLlamaForCausalLM(LlamaForCausalLM):
    config_class = CascadeLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        resize_per_layer(self)


class CascadeMistralConfig(MistralConfig):
    """MistralConfig; `per_layer` rides along as an extra field."""


class CascadeMistralForCausalLM(MistralForCausalLM):
    config_class = CascadeMistralConfig

    def __init__(self, config):
        super().__init__(config)
        resize_per_layer(self)


class CascadeQwen2Config(Qwen2Config):
    """Qwen2Config; `per_layer` rides along as an extra field."""


class CascadeQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = CascadeQwen2Config

    def __init__(self, config):
        super().__init__(config)
        resize_per_layer(self)


# model_type -> (config class, model class): what the exporter names in auto_map
CLASSES = {
    "llama": (CascadeLlamaConfig, CascadeLlamaForCausalLM),
    "mistral": (CascadeMistralConfig, CascadeMistralForCausalLM),
    "qwen2": (CascadeQwen2Config, CascadeQwen2ForCausalLM),
}
