"""Llama family adapter (Llama, Mistral, Qwen2): GQA attention and SwiGLU FFN.

A prunable attention unit is one KV head together with its query heads, so every layer keeps
num_heads == num_kv_heads * num_key_value_groups and the repeat_kv in the forward stays valid.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import PretrainedConfig

from stages.arch.base import ArchAdapter, LayerLayout, backbone, unwrap_model
from stages.arch.slicing import IN, OUT, UnitProjection, num_features


class LlamaAdapter(ArchAdapter):
    family = "llama"
    mlp_kind = "swiglu"
    model_types = ("llama", "mistral", "qwen2")
    streamable = True
    plain_lm_head = True
    # llama.cpp's converter writes Llama and Mistral as `llama`, Qwen2 (q/k/v biases, NEOX rope)
    # as `qwen2`
    gguf_architectures = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return backbone(model).layers

    def attn_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn.o_proj

    def mlp_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.down_proj

    def _layer_head_dim(self, layer: nn.Module) -> int:
        return int(layer.self_attn.head_dim)

    def _layer_layout(self, layer: nn.Module) -> LayerLayout:
        attn, head_dim = layer.self_attn, self._layer_head_dim(layer)
        return LayerLayout(
            num_heads=num_features(attn.q_proj, OUT) // head_dim,
            num_kv_heads=num_features(attn.k_proj, OUT) // head_dim,
            intermediate_size=num_features(layer.mlp.down_proj, IN),
        )

    def _attn_projections(self, layer: nn.Module) -> list[UnitProjection]:
        attn = layer.self_attn
        head_dim, groups = int(attn.head_dim), int(attn.num_key_value_groups)
        return [
            UnitProjection(attn.q_proj, OUT, groups * head_dim),
            UnitProjection(attn.k_proj, OUT, head_dim),
            UnitProjection(attn.v_proj, OUT, head_dim),
            UnitProjection(attn.o_proj, IN, groups * head_dim),
        ]

    def _mlp_projections(self, layer: nn.Module) -> list[UnitProjection]:
        mlp = layer.mlp
        return [
            UnitProjection(mlp.gate_proj, OUT, 1),
            UnitProjection(mlp.up_proj, OUT, 1),
            UnitProjection(mlp.down_proj, IN, 1),
        ]

    def _set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        # The forward reads head_dim, scaling (both unchanged by head pruning),
        # num_key_value_groups (repeat_kv / sdpa GQA) and layer_idx (cache).
        layer.self_attn.num_key_value_groups = num_heads // num_kv_heads

    def _set_mlp_shape(self, layer: nn.Module, channels: int) -> None:
        layer.mlp.intermediate_size = channels

    def _config_head_dim(self, config: PretrainedConfig) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def _apply_uniform_fields(
        self, config: PretrainedConfig, layout: LayerLayout, head_dim: int
    ) -> None:
        config.num_attention_heads = layout.num_heads
        config.num_key_value_heads = layout.num_kv_heads
        config.head_dim = head_dim  # explicit: hidden_size // num_heads no longer holds
        config.intermediate_size = layout.intermediate_size

    def uses_sliding_window(self, config: Mapping) -> bool:
        """Mistral has no switch (a set sliding_window is used); Qwen2 and Qwen3 do."""
        return bool(config.get("use_sliding_window", config.get("model_type") == "mistral"))

    def ensure_out_proj_bias(self, model: nn.Module, granularity: str) -> None:
        """FLAP bias compensation on Llama: switch on attention_bias / mlp_bias with zero biases.

        The vanilla config can only express biases on all of q/k/v/o (or gate/up/down) at once,
        so every projection gets a zero bias and the checkpoint stays plainly loadable.
        """
        config = unwrap_model(model).config
        if config.model_type != "llama":
            raise ValueError(
                f"bias compensation needs an output-projection bias; {config.model_type} configs "
                "cannot express one (supported: llama, gpt2, bert, opt, gpt_neox, qwen3 heads)"
            )
        flag = "attention_bias" if granularity == "heads" else "mlp_bias"
        for layer in self.layers(model):
            block = layer.self_attn if granularity == "heads" else layer.mlp
            names = (
                ("q_proj", "k_proj", "v_proj", "o_proj")
                if granularity == "heads"
                else ("gate_proj", "up_proj", "down_proj")
            )
            for name in names:
                linear = getattr(block, name)
                if linear.bias is None:
                    weight = linear.weight
                    linear.bias = nn.Parameter(
                        torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                    )
        setattr(config, flag, True)

    def lora_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def classifier_module_names(self) -> list[str]:
        return ["score"]
