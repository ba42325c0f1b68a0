"""OPT adapter: separate q/k/v/out_proj Linear (biased by default), fc1/fc2 ReLU FFN.

OPTAttention reshapes with `num_heads` and `head_dim` and scales queries by the fixed
`scaling`, so only num_heads follows the kept head count. OPTDecoder lives one level below the
base model (model.decoder.layers). A vanilla OPTConfig cannot express pruned heads
(head_dim = hidden / heads); FFN width (ffn_dim) and depth can.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from stages.arch.base import ArchAdapter, LayerLayout, backbone, unwrap_model
from stages.arch.slicing import IN, OUT, UnitProjection, num_features


def add_zero_biases(linears: Iterable[nn.Linear]) -> None:
    """Give every bias-free Linear a zero bias (outputs unchanged; FLAP can then shift it)."""
    for linear in linears:
        if linear.bias is None:
            weight = linear.weight
            linear.bias = nn.Parameter(
                torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            )


class OPTAdapter(ArchAdapter):
    family = "opt"
    mlp_kind = "relu"
    model_types = ("opt",)
    streamable = True
    plain_lm_head = True

    def layers(self, model: nn.Module) -> nn.ModuleList:
        base = backbone(model)
        return getattr(base, "decoder", base).layers  # OPTModel.decoder, or an OPTDecoder itself

    def attn_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn.out_proj

    def mlp_out_proj(self, layer: nn.Module) -> nn.Module:
        return layer.fc2

    def _layer_head_dim(self, layer: nn.Module) -> int:
        return int(layer.self_attn.head_dim)

    def _layer_layout(self, layer: nn.Module) -> LayerLayout:
        heads = num_features(layer.self_attn.q_proj, OUT) // self._layer_head_dim(layer)
        channels = num_features(layer.fc1, OUT)
        return LayerLayout(num_heads=heads, num_kv_heads=heads, intermediate_size=channels)

    def _attn_projections(self, layer: nn.Module) -> list[UnitProjection]:
        attn, head_dim = layer.self_attn, self._layer_head_dim(layer)
        return [
            UnitProjection(attn.q_proj, OUT, head_dim),
            UnitProjection(attn.k_proj, OUT, head_dim),
            UnitProjection(attn.v_proj, OUT, head_dim),
            UnitProjection(attn.out_proj, IN, head_dim),
        ]

    def _mlp_projections(self, layer: nn.Module) -> list[UnitProjection]:
        return [UnitProjection(layer.fc1, OUT, 1), UnitProjection(layer.fc2, IN, 1)]

    def _set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        if num_heads != num_kv_heads:
            raise ValueError(
                f"opt attention is MHA: num_heads {num_heads} != num_kv_heads {num_kv_heads}"
            )
        layer.self_attn.num_heads = num_heads  # read by .view(bsz, -1, num_heads, head_dim)

    def _set_mlp_shape(self, layer: nn.Module, channels: int) -> None:
        """OPTDecoderLayer keeps no FFN width attribute besides the Linear features."""

    def _apply_uniform_fields(
        self, config: PretrainedConfig, layout: LayerLayout, head_dim: int
    ) -> None:
        config.ffn_dim = layout.intermediate_size  # heads: not expressible (head_dim is derived)

    def ensure_out_proj_bias(self, model: nn.Module, granularity: str) -> None:
        """OPT's enable_bias switches q/k/v/out_proj AND fc1/fc2 biases on together."""
        for layer in self.layers(model):
            attn = layer.self_attn
            add_zero_biases(
                [attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, layer.fc1, layer.fc2]
            )
        unwrap_model(model).config.enable_bias = True

    def lora_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

    def classifier_module_names(self) -> list[str]:
        return ["score"]
