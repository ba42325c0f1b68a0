"""GPT-NeoX adapter (Pythia): fused query_key_value interleaved per head, GELU MLP.

query_key_value's output is viewed as [..., heads, 3 * head_size] (q|k|v of one head next to
each other), so one head owns one contiguous block of 3 * head_size rows and the forward infers
the head count (-1 in the view). head_size, scaling and the (partial) rotary width depend on the
head size only, so head pruning needs no attribute update. A vanilla GPTNeoXConfig cannot
express pruned heads (head_size = hidden / heads); intermediate_size and depth can.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from stages.arch.base import ArchAdapter, LayerLayout, backbone, unwrap_model
from stages.arch.opt import add_zero_biases
from stages.arch.slicing import IN, OUT, UnitProjection, num_features


class GPTNeoXAdapter(ArchAdapter):
    family = "gpt_neox"
    mlp_kind = "gelu"
    model_types = ("gpt_neox",)
    streamable = True
    plain_lm_head = True

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return backbone(model).layers

    def attn_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.attention.dense

    def mlp_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.dense_4h_to_h

    def _layer_head_dim(self, layer: nn.Module) -> int:
        return int(layer.attention.head_size)

    def _layer_layout(self, layer: nn.Module) -> LayerLayout:
        heads = num_features(layer.attention.dense, IN) // self._layer_head_dim(layer)
        channels = num_features(layer.mlp.dense_h_to_4h, OUT)
        return LayerLayout(num_heads=heads, num_kv_heads=heads, intermediate_size=channels)

    def _attn_projections(self, layer: nn.Module) -> list[UnitProjection]:
        attn, head_dim = layer.attention, self._layer_head_dim(layer)
        return [
            UnitProjection(attn.query_key_value, OUT, 3 * head_dim),  # per-head q|k|v block
            UnitProjection(attn.dense, IN, head_dim),
        ]

    def _mlp_projections(self, layer: nn.Module) -> list[UnitProjection]:
        mlp = layer.mlp
        return [UnitProjection(mlp.dense_h_to_4h, OUT, 1), UnitProjection(mlp.dense_4h_to_h, IN, 1)]

    def _set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """The forward reads only head_size, scaling and layer_idx: nothing per head count."""
        if num_heads != num_kv_heads:
            raise ValueError(
                f"gpt_neox attention is MHA: num_heads {num_heads} != num_kv_heads {num_kv_heads}"
            )

    def _set_mlp_shape(self, layer: nn.Module, channels: int) -> None:
        """GPTNeoXMLP keeps no width attribute besides the Linear features."""

    def _apply_uniform_fields(
        self, config: PretrainedConfig, layout: LayerLayout, head_dim: int
    ) -> None:
        config.intermediate_size = layout.intermediate_size  # heads: not expressible

    def ensure_out_proj_bias(self, model: nn.Module, granularity: str) -> None:
        """The MLP is always biased; attention_bias switches query_key_value and dense together."""
        if granularity != "heads":
            return
        for layer in self.layers(model):
            add_zero_biases([layer.attention.query_key_value, layer.attention.dense])
        unwrap_model(model).config.attention_bias = True

    def lora_target_modules(self) -> list[str]:
        return ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]

    def classifier_module_names(self) -> list[str]:
        return ["score"]
