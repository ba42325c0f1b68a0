"""Phi-3 adapter: fused qkv_proj = [Q | K | V] (uneven widths under GQA), fused gate_up_proj.

A prunable attention unit is one KV head with its query heads. Its rows in qkv_proj lie in
three blocks of different widths (g * head_dim in Q, head_dim in K and in V), which the
base's equal-segment UnitProjection cannot describe, so qkv_proj is sliced here and o_proj /
the MLP go through the base. gate_up_proj = [gate | up] is two equal segments.

Phi3Attention.forward reads `self.config.num_attention_heads` to split the fused output, and
the config is shared by all layers: a layer with a pruned head count gets a read-through view
of the model config that overrides only that field. Phi3Config has no head_dim field, but the
modelling code honours an explicit `head_dim` attribute, so uniform layouts stay vanilla.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stages.arch.base import LayerLayout
from stages.arch.llama import LlamaAdapter
from stages.arch.slicing import (
    IN,
    OUT,
    TensorGetter,
    UnitProjection,
    check_projection,
    feature_rows,
    num_features,
    resize_features,
    select_features,
    unit_feature_index,
    validate_keep,
)


class LayerConfigView:
    """The shared model config seen through per-layer overrides (reads and writes reach it)."""

    def __init__(self, base, **overrides) -> None:
        self.__dict__["_base"] = base
        self.__dict__["_overrides"] = dict(overrides)

    def __getattr__(self, name: str):
        state = self.__dict__
        if "_base" not in state:  # mid-unpickling / copying: behave like an empty object
            raise AttributeError(name)
        if name in state["_overrides"]:
            return state["_overrides"][name]
        return getattr(state["_base"], name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._base, name, value)

    def __repr__(self) -> str:
        return f"LayerConfigView({type(self._base).__name__}, {self._overrides})"


def shared_config(config):
    """The model config behind a (possibly) per-layer view."""
    return config._base if isinstance(config, LayerConfigView) else config


def qkv_feature_index(keep: Tensor, layout: LayerLayout, head_dim: int) -> Tensor:
    """qkv_proj output rows of the kept KV groups: their query heads, key head and value head."""
    units, heads = layout.num_kv_heads, layout.num_heads
    q_width = heads // units * head_dim
    q_rows = unit_feature_index(keep, units, q_width)
    k_rows = heads * head_dim + unit_feature_index(keep, units, head_dim)
    v_rows = (heads + units) * head_dim + unit_feature_index(keep, units, head_dim)
    return torch.cat([q_rows, k_rows, v_rows])


def qkv_unit_rows(tensor: Tensor, layout: LayerLayout, head_dim: int) -> list[Tensor]:
    """[units, k] rows of Q, K and V blocks of an output-major tensor (weight rows or bias)."""
    units, heads = layout.num_kv_heads, layout.num_heads
    q, k, v = tensor.split([heads * head_dim, units * head_dim, units * head_dim])
    return [block.reshape(units, -1) for block in (q, k, v)]


class Phi3Adapter(LlamaAdapter):
    family = "phi3"
    mlp_kind = "swiglu"
    model_types = ("phi3",)
    gguf_architectures = {}  # fused qkv_proj / gate_up_proj: not written by the GGUF exporter

    def _layer_layout(self, layer: nn.Module) -> LayerLayout:
        attn, head_dim = layer.self_attn, self._layer_head_dim(layer)
        heads = num_features(attn.o_proj, IN) // head_dim
        kv_heads = (num_features(attn.qkv_proj, OUT) // head_dim - heads) // 2
        channels = num_features(layer.mlp.down_proj, IN)
        return LayerLayout(num_heads=heads, num_kv_heads=kv_heads, intermediate_size=channels)

    def _attn_projections(self, layer: nn.Module) -> list[UnitProjection]:
        """Only o_proj: qkv_proj's uneven blocks are handled by the overrides below."""
        attn = layer.self_attn
        return [UnitProjection(attn.o_proj, IN, int(attn.num_key_value_groups) * attn.head_dim)]

    def _mlp_projections(self, layer: nn.Module) -> list[UnitProjection]:
        mlp = layer.mlp
        return [
            UnitProjection(mlp.gate_up_proj, OUT, 1, segments=2),
            UnitProjection(mlp.down_proj, IN, 1),
        ]

    def _set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        attn = layer.self_attn
        attn.num_key_value_heads = num_kv_heads  # K/V split of qkv_proj's output
        attn.num_key_value_groups = num_heads // num_kv_heads  # repeat_kv / sdpa GQA
        base = shared_config(attn.config)
        if num_heads == base.num_attention_heads:
            attn.config = base
        else:  # the Q split reads config.num_attention_heads
            attn.config = LayerConfigView(base, num_attention_heads=num_heads)

    def _set_mlp_shape(self, layer: nn.Module, channels: int) -> None:
        """Phi3MLP splits gate|up with chunk(2): no width attribute to update."""

    # ---- qkv_proj: the uneven fused projection ------------------------------------------------
    def attn_unit_tensors(
        self, model: nn.Module, layer_idx: int, get: TensorGetter
    ) -> list[Tensor]:
        layer = self._layer(model, layer_idx)
        layout, head_dim = self._layer_layout(layer), self._layer_head_dim(layer)
        qkv = check_projection(layer.self_attn.qkv_proj)
        rows: list[Tensor] = []
        for name in ("weight", "bias"):
            param = getattr(qkv, name)
            if param is None:
                continue
            value = get(param)
            if value is None:
                raise ValueError(f"phi3 qkv_proj.{name} has no value to read (no .grad yet?)")
            if name == "weight":
                value = feature_rows(value, qkv, OUT)
            rows.extend(qkv_unit_rows(value, layout, head_dim))
        return rows + super().attn_unit_tensors(model, layer_idx, get)

    def prune_attention(self, model: nn.Module, layer_idx: int, keep: Sequence[int]) -> None:
        layer = self._layer(model, layer_idx)
        before, head_dim = self._layer_layout(layer), self._layer_head_dim(layer)
        index = validate_keep(keep, before.num_kv_heads, f"phi3 layer {layer_idx} attention")
        qkv = check_projection(layer.self_attn.qkv_proj)  # refuse LoRA before slicing anything
        super().prune_attention(model, layer_idx, keep)  # o_proj + per-layer attributes
        select_features(qkv, OUT, qkv_feature_index(index, before, head_dim))

    def resize_to_layout(self, model: nn.Module, layouts: list[LayerLayout]) -> None:
        super().resize_to_layout(model, layouts)
        for layer, target in zip(self.layers(model), layouts):
            rows = (target.num_heads + 2 * target.num_kv_heads) * self._layer_head_dim(layer)
            resize_features(layer.self_attn.qkv_proj, OUT, rows)

    def ensure_out_proj_bias(self, model: nn.Module, granularity: str) -> None:
        raise ValueError(
            "bias compensation is not supported for phi3: Phi3Config cannot express "
            "projection biases (qkv_proj/o_proj/gate_up_proj/down_proj are bias-free)"
        )

    def lora_target_modules(self) -> list[str]:
        return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
