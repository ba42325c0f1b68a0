"""Family-independent part of the architecture adapters.

An adapter knows where layers, attention units and FFN channels live in a Hugging Face model and
slices them physically. Families only describe their modules (which projections hold a unit's
features, which attributes the forward reads); pruning, resizing for loading, per-unit weights
and costs are derived here from those descriptions, so they cannot disagree with each other.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers import AutoModel, PretrainedConfig

from stages.arch.slicing import (
    TensorGetter,
    UnitProjection,
    check_projection,
    out_in_weight,
    resize_features,
    select_features,
    unit_feature_index,
    unit_rows,
    validate_keep,
)


class UnsupportedArchitecture(ValueError):
    """The model's config.model_type has no adapter (the message lists the supported ones)."""


@dataclass(frozen=True)
class LayerLayout:
    """Shape of one transformer layer after (possibly heterogeneous) pruning."""

    num_heads: int  # query heads in this layer
    num_kv_heads: int  # key/value heads (== num_heads for MHA)
    intermediate_size: int  # FFN channels


def _weights(param: nn.Parameter) -> Tensor:
    return param.detach()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def backbone(model: nn.Module) -> nn.Module:
    """The base transformer (LlamaModel, GPT2Model, BertModel) of a task model or of itself."""
    model = unwrap_model(model)
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


class ArchAdapter:
    """Stateless: every method takes the model (or config); one subclass per family."""

    family: ClassVar[str]  # a name for reports and the checkpoint's "pruning" section only
    mlp_kind: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    # Capabilities other code branches on (never on `family` or `model_type`; tests/test_layering.py
    # refuses such a branch outside stages/arch/):
    is_decoder: ClassVar[bool] = True  # causal self-attention with a KV cache at inference
    # weights stored [in, out] (GPT-2 Conv1D): LoRA needs fan_in_fan_out
    conv1d_weights: ClassVar[bool] = False
    # cached K/V are views that keep the fused q|k|v output alive (memory model)
    fused_qkv_cache: ClassVar[bool] = False
    # the layer-streamed path (cluster/stream_prune.py) runs its layers one at a time; opt in once
    # tests/test_streaming.py gives the in-memory scores for the family
    streamable: ClassVar[bool] = False
    # AutoModel adds a pooler by default (add_pooling_layer) that mean-pooled embeddings never use
    has_pooler: ClassVar[bool] = False
    # llama.cpp architecture a uniform layout is written as, per model type (`cascade export
    # --format gguf`). These model types are Llama-shaped: a per-layer layout is written as `deci`
    # (DeciLM / Nemotron-NAS), the model vLLM and TensorRT-LLM would take per-layer widths
    # through. A model type not listed has neither.
    gguf_architectures: ClassVar[Mapping[str, str]] = {}
    # the causal-LM forward is exactly lm_head(backbone(x)): no logit scaling or soft-capping, so
    # the LM head and loss may run a chunk of tokens at a time (stages/objectives/lm_chunks.py)
    plain_lm_head: ClassVar[bool] = False

    # ---- family hooks -------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def attn_out_proj(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def mlp_out_proj(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def _layer_head_dim(self, layer: nn.Module) -> int:
        raise NotImplementedError

    def _layer_layout(self, layer: nn.Module) -> LayerLayout:
        raise NotImplementedError

    def _attn_projections(self, layer: nn.Module) -> list[UnitProjection]:
        """Projections holding each attention unit's features (widths from live attributes)."""
        raise NotImplementedError

    def _mlp_projections(self, layer: nn.Module) -> list[UnitProjection]:
        raise NotImplementedError

    def _set_attention_shape(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Set every per-layer attribute the attention forward reads for this head count."""
        raise NotImplementedError

    def _set_mlp_shape(self, layer: nn.Module, channels: int) -> None:
        raise NotImplementedError

    def _apply_uniform_fields(
        self, config: PretrainedConfig, layout: LayerLayout, head_dim: int
    ) -> None:
        """Write the vanilla config fields this family can express for a uniform layout."""
        raise NotImplementedError

    def _config_head_dim(self, config: PretrainedConfig) -> int:
        return config.hidden_size // config.num_attention_heads

    def _check_layer_removal(self, model: nn.Module, kept: list[int]) -> None:
        """Families refuse removals their forward cannot represent after renumbering."""

    def ensure_out_proj_bias(self, model: nn.Module, granularity: str) -> None:
        """Give the output projections a (zero) bias where the family can express one."""
        raise ValueError(f"bias compensation is not supported for the {self.family} family")

    def gguf_architecture(self, model_type: str) -> str | None:
        """llama.cpp architecture of a uniform layout of `model_type`; None: no GGUF export."""
        return self.gguf_architectures.get(model_type)

    def uses_sliding_window(self, config: Mapping) -> bool:
        """Whether transformers attends only within config["sliding_window"] (when it is set)."""
        return bool(config.get("use_sliding_window", False))

    def lora_target_modules(self) -> list[str]:
        raise NotImplementedError

    def classifier_module_names(self) -> list[str]:
        raise NotImplementedError

    # ---- queries --------------------------------------------------------------------------
    def attention_kind(self, config: PretrainedConfig) -> str:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        if kv == heads:
            return "mha"
        return "mqa" if kv == 1 else "gqa"

    def _layer(self, model: nn.Module, layer_idx: int) -> nn.Module:
        layers = self.layers(model)
        if not 0 <= layer_idx < len(layers):
            raise IndexError(
                f"{self.family}: layer index {layer_idx} out of range [0, {len(layers)})"
            )
        return layers[layer_idx]

    def layout(self, model: nn.Module) -> list[LayerLayout]:
        return [self._layer_layout(layer) for layer in self.layers(model)]

    def head_dim(self, model: nn.Module) -> int:
        return self._layer_head_dim(self._layer(model, 0))

    def heads_per_unit(self, model: nn.Module) -> int:
        first = self._layer_layout(self._layer(model, 0))
        return first.num_heads // first.num_kv_heads

    def attn_units(self, model: nn.Module, layer_idx: int) -> int:
        """Prunable attention units: heads (MHA) or whole KV groups (GQA/MQA)."""
        return self._layer_layout(self._layer(model, layer_idx)).num_kv_heads

    def mlp_units(self, model: nn.Module, layer_idx: int) -> int:
        return self._layer_layout(self._layer(model, layer_idx)).intermediate_size

    def out_proj_weight(self, module: nn.Module) -> Tensor:
        return out_in_weight(module)

    # ---- per-unit tensors and costs ---------------------------------------------------------
    def attn_unit_tensors(
        self, model: nn.Module, layer_idx: int, get: TensorGetter
    ) -> list[Tensor]:
        """[units, k] rows (q/k/v rows + biases, out-proj columns) read through `get`."""
        layer = self._layer(model, layer_idx)
        units = self.attn_units(model, layer_idx)
        return [t for p in self._attn_projections(layer) for t in unit_rows(p, units, get)]

    def mlp_unit_tensors(self, model: nn.Module, layer_idx: int, get: TensorGetter) -> list[Tensor]:
        """[channels, k] rows (fc-in/gate rows + biases, fc-out columns) read through `get`."""
        layer = self._layer(model, layer_idx)
        units = self.mlp_units(model, layer_idx)
        return [t for p in self._mlp_projections(layer) for t in unit_rows(p, units, get)]

    def attn_unit_weights(self, model: nn.Module, layer_idx: int) -> list[Tensor]:
        return self.attn_unit_tensors(model, layer_idx, _weights)

    def mlp_unit_weights(self, model: nn.Module, layer_idx: int) -> list[Tensor]:
        return self.mlp_unit_tensors(model, layer_idx, _weights)

    def attn_unit_cost(self, model: nn.Module, layer_idx: int) -> int:
        """Parameters removed with one attention unit (biases included)."""
        return sum(t.shape[1] for t in self.attn_unit_weights(model, layer_idx))

    def mlp_unit_cost(self, model: nn.Module, layer_idx: int) -> int:
        return sum(t.shape[1] for t in self.mlp_unit_weights(model, layer_idx))

    # ---- one granularity ("heads" = attention units, "channels" = FFN channels) --------------
    def out_proj(self, layer: nn.Module, granularity: str) -> nn.Module:
        """The module whose input columns are grouped by this granularity's units."""
        return self.attn_out_proj(layer) if granularity == "heads" else self.mlp_out_proj(layer)

    def unit_width(self, model: nn.Module, granularity: str) -> int:
        """Input columns of the out-projection per unit."""
        return self.head_dim(model) * self.heads_per_unit(model) if granularity == "heads" else 1

    def units(self, model: nn.Module, layer_idx: int, granularity: str) -> int:
        if granularity == "heads":
            return self.attn_units(model, layer_idx)
        return self.mlp_units(model, layer_idx)

    def unit_cost(self, model: nn.Module, layer_idx: int, granularity: str) -> int:
        if granularity == "heads":
            return self.attn_unit_cost(model, layer_idx)
        return self.mlp_unit_cost(model, layer_idx)

    def layer_cost(self, model: nn.Module, layer_idx: int) -> int:
        return sum(p.numel() for p in self._layer(model, layer_idx).parameters())

    # ---- slicing ----------------------------------------------------------------------------
    @staticmethod
    def _checked(projections: list[UnitProjection]) -> list[UnitProjection]:
        """Check every module before slicing any, so a refusal never leaves a half-pruned layer."""
        for proj in projections:
            check_projection(proj.module)
        return projections

    def prune_attention(self, model: nn.Module, layer_idx: int, keep: Sequence[int]) -> None:
        """Keep only the attention units `keep` (heads, or whole KV groups with their queries)."""
        layer = self._layer(model, layer_idx)
        before = self._layer_layout(layer)
        units = before.num_kv_heads
        index = validate_keep(keep, units, f"{self.family} layer {layer_idx} attention")
        projections = self._checked(self._attn_projections(layer))
        for proj in projections:
            select_features(
                proj.module, proj.side, unit_feature_index(index, units, proj.width, proj.segments)
            )
        per_unit = before.num_heads // before.num_kv_heads
        self._set_attention_shape(layer, len(index) * per_unit, len(index))

    def prune_mlp(self, model: nn.Module, layer_idx: int, keep: Sequence[int]) -> None:
        """Keep only the FFN channels `keep` (gate+up+down together for SwiGLU)."""
        layer = self._layer(model, layer_idx)
        units = self._layer_layout(layer).intermediate_size
        index = validate_keep(keep, units, f"{self.family} layer {layer_idx} mlp")
        for proj in self._checked(self._mlp_projections(layer)):
            select_features(
                proj.module, proj.side, unit_feature_index(index, units, proj.width, proj.segments)
            )
        self._set_mlp_shape(layer, len(index))

    def remove_layers(self, model: nn.Module, drop: Sequence[int]) -> None:
        """Delete whole layers; renumber layer_idx and update num_hidden_layers / layer_types."""
        layers = self.layers(model)
        n = len(layers)
        drop_list = [int(i) for i in drop]
        drop_set = set(drop_list)
        if len(drop_set) != len(drop_list):
            raise ValueError(f"{self.family} remove_layers: duplicate indices in {drop_list}")
        bad = sorted(i for i in drop_set if not 0 <= i < n)
        if bad:
            raise ValueError(f"{self.family} remove_layers: indices {bad} out of range [0, {n})")
        if len(drop_set) == n:
            raise ValueError(f"{self.family} remove_layers: refusing to remove all {n} layers")
        kept = [i for i in range(n) if i not in drop_set]
        self._check_layer_removal(model, kept)
        for i in sorted(drop_set, reverse=True):
            del layers[i]
        for new_idx, layer in enumerate(layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        config = unwrap_model(model).config
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == n:
            config.layer_types = [layer_types[i] for i in kept]
        config.num_hidden_layers = len(kept)

    def resize_to_layout(self, model: nn.Module, layouts: list[LayerLayout]) -> None:
        """Give every layer the shapes of `layouts` with uninitialised (e.g. meta) parameters.

        Meant for loading: build the architecture from its config (under
        init_empty_weights), call this, then load_state_dict(..., assign=True).
        """
        layers = self.layers(model)
        if len(layouts) != len(layers):
            raise ValueError(
                f"{self.family} resize_to_layout: {len(layouts)} layouts for {len(layers)} layers "
                "(config.num_hidden_layers must match the saved layout)"
            )
        for i, (layer, target) in enumerate(zip(layers, layouts)):
            if target.num_kv_heads < 1 or target.num_heads % target.num_kv_heads:
                raise ValueError(f"{self.family} layer {i}: invalid layout {target}")
            self._set_attention_shape(layer, target.num_heads, target.num_kv_heads)
            for proj in self._attn_projections(layer):
                count = proj.segments * target.num_kv_heads * proj.width
                resize_features(proj.module, proj.side, count)
            for proj in self._mlp_projections(layer):
                resize_features(
                    proj.module, proj.side, proj.segments * target.intermediate_size * proj.width
                )
            self._set_mlp_shape(layer, target.intermediate_size)

    # ---- configs ----------------------------------------------------------------------------
    def write_uniform_config(self, config: PretrainedConfig, layouts: list[LayerLayout]) -> bool:
        """Express a uniform layout in the vanilla config fields, if plain transformers can.

        Verified, not assumed: the edited config is round-tripped through to_dict/from_dict
        (config validation included) and a meta-device build of it must have exactly these
        per-layer shapes. On False the config is left untouched.
        """
        if not layouts or any(layout != layouts[0] for layout in layouts):
            return False
        head_dim = self._config_head_dim(config)
        trial = copy.deepcopy(config)
        self._apply_uniform_fields(trial, layouts[0], head_dim)
        trial.num_hidden_layers = len(layouts)
        try:
            rebuilt = type(config).from_dict(trial.to_dict())
            with torch.device("meta"):
                vanilla = AutoModel.from_config(rebuilt)
        except Exception:  # any validation/construction failure means "not expressible"
            return False
        if self.layout(vanilla) != list(layouts) or self.head_dim(vanilla) != head_dim:
            return False
        self._apply_uniform_fields(config, layouts[0], head_dim)
        config.num_hidden_layers = len(layouts)
        return True
