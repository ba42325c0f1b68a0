"""GPT-2 adapter: Conv1D weights stored [in, out], fused c_attn (q|k|v), GELU MLP.

The attention forward splits c_attn's output with `split_size` and reshapes with `head_dim`,
so both must follow the kept head count. Head pruning cannot be expressed by a vanilla
GPT2Config (head_dim = n_embd / n_head); FFN width (n_inner) and depth can.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from stages.arch.base import ArchAdapter, LayerLayout, backbone, unwrap_model
from stages.arch.slicing import IN, OUT, UnitProjection, num_features


class GPT2Adapter(ArchAdapter):
    family = "gpt2"
    mlp_kind = "gelu"
    model_types = ("gpt2",)
    streamable = True
    plain_lm_head = True
    conv1d_weights = True
    fused_qkv_cache = True

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return backbone(model).h

    def attn_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.attn.c_proj

    def mlp_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.c_proj

    def _layer_head_dim(self, layer: nn.Module) -> int:
        return int(layer.attn.head_dim)

    def _layer_layout(self, layer: nn.Module) -> LayerLayout:
        heads = num_features(layer.attn.c_proj, IN) // self._layer_head_dim(layer)
        channels = num_features(layer.mlp.c_fc, OUT)
        return LayerLayout(num_heads=heads, num_kv_heads=heads, intermediate_size=channels)

    def _attn_projections(self, layer: nn.Module) -> list[UnitProjection]:
        attn, head_dim = layer.attn, self._layer_head_dim(layer)
        return [
            UnitProjection(attn.c_attn, OUT, head_dim, segments=3),
            UnitProjection(attn.c_proj, IN, head_dim),
        ]

    def _mlp_projections(self, layer: nn.Module) -> list[UnitProjection]:
        return [UnitProjection(layer.mlp.c_fc, OUT, 1), UnitProjection(layer.mlp.c_proj, IN, 1)]

    def _set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        if num_heads != num_kv_heads:
            raise ValueError(
                f"gpt2 attention is MHA: num_heads {num_heads} != num_kv_heads {num_kv_heads}"
            )
        attn = layer.attn
        attn.num_heads = num_heads
        attn.split_size = num_heads * attn.head_dim  # read by c_attn(...).split(split_size)

    def _set_mlp_shape(self, layer: nn.Module, channels: int) -> None:
        """GPT2MLP keeps no width attribute: Conv1D.nf/nx (already updated) are all it reads."""

    def _check_layer_removal(self, model: nn.Module, kept: list[int]) -> None:
        config = unwrap_model(model).config
        moved = any(old != new for new, old in enumerate(kept))
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) and moved:
            raise ValueError(
                "gpt2 remove_layers: scale_attn_by_inverse_layer_idx=True ties attention scaling to "
                "layer_idx, so layers can only be dropped from the end"
            )

    def _apply_uniform_fields(
        self, config: PretrainedConfig, layout: LayerLayout, head_dim: int
    ) -> None:
        config.n_inner = layout.intermediate_size  # heads: not expressible (head_dim is derived)

    def lora_target_modules(self) -> list[str]:
        return ["c_attn", "c_proj", "c_fc"]

    def classifier_module_names(self) -> list[str]:
        return ["score"]
