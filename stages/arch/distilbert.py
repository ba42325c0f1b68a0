"""DistilBERT adapter: q_lin/k_lin/v_lin/out_lin with biases, post-LN, GELU FFN (lin1/lin2).

DistilBertSelfAttention reshapes with attention_head_size (unchanged by head pruning) and -1
for the head count; n_heads and dim are kept consistent for readers. DistilBertConfig maps
num_hidden_layers to n_layers. A vanilla config cannot express pruned heads (head size = dim /
n_heads); FFN width (hidden_dim) and depth can.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from stages.arch.base import ArchAdapter, LayerLayout, backbone
from stages.arch.slicing import IN, OUT, UnitProjection, num_features


class DistilBertAdapter(ArchAdapter):
    family = "distilbert"
    mlp_kind = "gelu"
    model_types = ("distilbert",)
    is_decoder = False

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return backbone(model).transformer.layer

    def attn_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.attention.out_lin

    def mlp_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.ffn.lin2

    def _layer_head_dim(self, layer: nn.Module) -> int:
        return int(layer.attention.attention_head_size)

    def _layer_layout(self, layer: nn.Module) -> LayerLayout:
        heads = num_features(layer.attention.q_lin, OUT) // self._layer_head_dim(layer)
        channels = num_features(layer.ffn.lin1, OUT)
        return LayerLayout(num_heads=heads, num_kv_heads=heads, intermediate_size=channels)

    def _attn_projections(self, layer: nn.Module) -> list[UnitProjection]:
        attn, head_dim = layer.attention, self._layer_head_dim(layer)
        return [
            UnitProjection(attn.q_lin, OUT, head_dim),
            UnitProjection(attn.k_lin, OUT, head_dim),
            UnitProjection(attn.v_lin, OUT, head_dim),
            UnitProjection(attn.out_lin, IN, head_dim),
        ]

    def _mlp_projections(self, layer: nn.Module) -> list[UnitProjection]:
        return [UnitProjection(layer.ffn.lin1, OUT, 1), UnitProjection(layer.ffn.lin2, IN, 1)]

    def _set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        if num_heads != num_kv_heads:
            raise ValueError(
                f"distilbert attention is MHA: num_heads {num_heads} != num_kv_heads {num_kv_heads}"
            )
        attn = layer.attention
        attn.n_heads = num_heads
        attn.dim = num_heads * attn.attention_head_size

    def _set_mlp_shape(self, layer: nn.Module, channels: int) -> None:
        """FFN keeps no width attribute besides the Linear features."""

    def _apply_uniform_fields(
        self, config: PretrainedConfig, layout: LayerLayout, head_dim: int
    ) -> None:
        config.hidden_dim = layout.intermediate_size  # heads: not expressible

    def lora_target_modules(self) -> list[str]:
        return ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]

    def classifier_module_names(self) -> list[str]:
        return ["pre_classifier", "classifier"]
