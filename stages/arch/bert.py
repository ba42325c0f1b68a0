"""BERT adapter: separate query/key/value Linear with biases, post-LN, GELU FFN.

BertSelfAttention reshapes with `attention_head_size` (unchanged by head pruning); the head
count and all_head_size are kept consistent too. A vanilla BertConfig cannot express pruned
heads (head size = hidden / heads); FFN width and depth stay vanilla-loadable.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from stages.arch.base import ArchAdapter, LayerLayout, backbone
from stages.arch.slicing import IN, OUT, UnitProjection, num_features


class BertAdapter(ArchAdapter):
    family = "bert"
    mlp_kind = "gelu"
    model_types = ("bert",)
    is_decoder = False
    has_pooler = True  # AutoModel's BertPooler (dropped for mean-pooled embeddings)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return backbone(model).encoder.layer

    def attn_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.attention.output.dense

    def mlp_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.output.dense

    def _layer_head_dim(self, layer: nn.Module) -> int:
        return int(layer.attention.self.attention_head_size)

    def _layer_layout(self, layer: nn.Module) -> LayerLayout:
        heads = num_features(layer.attention.self.query, OUT) // self._layer_head_dim(layer)
        channels = num_features(layer.intermediate.dense, OUT)
        return LayerLayout(num_heads=heads, num_kv_heads=heads, intermediate_size=channels)

    def _attn_projections(self, layer: nn.Module) -> list[UnitProjection]:
        attn, head_dim = layer.attention.self, self._layer_head_dim(layer)
        return [
            UnitProjection(attn.query, OUT, head_dim),
            UnitProjection(attn.key, OUT, head_dim),
            UnitProjection(attn.value, OUT, head_dim),
            UnitProjection(layer.attention.output.dense, IN, head_dim),
        ]

    def _mlp_projections(self, layer: nn.Module) -> list[UnitProjection]:
        return [
            UnitProjection(layer.intermediate.dense, OUT, 1),
            UnitProjection(layer.output.dense, IN, 1),
        ]

    def _set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        if num_heads != num_kv_heads:
            raise ValueError(
                f"bert attention is MHA: num_heads {num_heads} != num_kv_heads {num_kv_heads}"
            )
        attn = layer.attention.self
        attn.num_attention_heads = num_heads
        attn.all_head_size = num_heads * attn.attention_head_size

    def _set_mlp_shape(self, layer: nn.Module, channels: int) -> None:
        """BertIntermediate/BertOutput keep no width attribute besides the Linear features."""

    def _apply_uniform_fields(
        self, config: PretrainedConfig, layout: LayerLayout, head_dim: int
    ) -> None:
        config.intermediate_size = layout.intermediate_size  # heads: not expressible

    def lora_target_modules(self) -> list[str]:
        # "output.dense" matches attention.output.dense and the FFN output; the pooler is left out.
        return ["query", "key", "value", "intermediate.dense", "output.dense"]

    def classifier_module_names(self) -> list[str]:
        return ["classifier"]
