"""Qwen3 adapter: the Llama layout (GQA, SwiGLU) plus per-head q_norm/k_norm and layer_types.

q_norm and k_norm are RMSNorms over head_dim, shared by all heads of a layer, so head pruning
leaves them untouched. Layer removal keeps config.layer_types in step (the base does it), which
Qwen3Model indexes per layer to pick the full or sliding-window mask.
"""

from __future__ import annotations

from torch import nn

from stages.arch.base import unwrap_model
from stages.arch.llama import LlamaAdapter
from stages.arch.opt import add_zero_biases


class Qwen3Adapter(LlamaAdapter):
    family = "qwen3"
    model_types = ("qwen3",)
    gguf_architectures = {}  # q_norm / k_norm: not a Llama-shaped layer (nor DeciLM)

    def ensure_out_proj_bias(self, model: nn.Module, granularity: str) -> None:
        """attention_bias gives q/k/v/o zero biases; Qwen3's MLP has no bias switch."""
        if granularity != "heads":
            raise ValueError(
                "bias compensation for channels needs an MLP bias; Qwen3Config cannot express one "
                "(use it for heads, or a llama/gpt2/bert/opt/gpt_neox model)"
            )
        for layer in self.layers(model):
            attn = layer.self_attn
            add_zero_biases([attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj])
        unwrap_model(model).config.attention_bias = True
