"""Analytic inference memory and roofline throughput of a (possibly heterogeneous) model.

Pure arithmetic on a `ModelShape` (read once from a model, real or on the meta device) and a
workload (batch, sequence length, bytes per element). The formulas, all in elements x bytes:

  weights   = parameters x bytes + buffers (at their own dtype)
  kv_cache  = sum over layers of 2 x kv_heads_l x head_dim x seq x batch   (decoders only;
              GPT-2's cache holds views of the fused c_attn output, so (heads_l + 2 x kv_heads_l))
  workspace = 3 x T x hidden                       residual in/out + normed input (T = batch x seq)
            + max over layers of max(attention_l, mlp_l)    (layers run one after another)
            + T x logits_width + attention mask (batch x seq^2, 1 byte unless eager)
    attention_l = T x head_dim x (3 x heads_l + 2 x kv_heads_l)   q, output, repeat_kv copies
                  + 2 x batch x heads_l x seq^2 when the attention is eager (scores + probs)
    mlp_l       = 3 x T x intermediate_l       (fc output + activation temporaries; SwiGLU:
                                                act(gate), up and their product)
Roofline on a device (decode is memory bound, classification mostly compute bound):
  decode tokens/s  <= batch x bandwidth / (weights read per step + kv_cache)
  samples/s        <= batch / max(forward FLOPs / peak FLOP/s, bytes read / bandwidth)
  forward FLOPs     = 2 x matmul parameters x T + sum over layers of 4 x batch x seq^2 x heads_l x head_dim
Weights read per step exclude input embedding tables (a lookup reads one row per token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from stages.arch import get_adapter
from stages.arch.base import backbone
from stages.checkpoint import CheckpointError, build_on_meta, saved_layouts

REALISM_FACTOR = 0.6  # real decoders reach ~60% of the bandwidth bound


@dataclass(frozen=True)
class LayerShape:
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class ModelShape:
    """Everything the memory/throughput formulas need about one model."""

    family: str
    params: int
    embedding_params: int
    buffer_bytes: int
    hidden: int
    head_dim: int
    layers: tuple[LayerShape, ...]
    logits_width: int
    decoder: bool
    eager_attention: bool
    fused_qkv_cache: bool = False  # cached K/V are views that keep the fused q|k|v output alive

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace

    def to_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or its name ("bfloat16", "float32", ...)."""
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved
    return torch.empty((), dtype=dtype).element_size()


def model_shape(model: nn.Module) -> ModelShape:
    """Read the shape facts from a model (works on the meta device: no data is touched)."""
    adapter = get_adapter(model)
    config = model.config
    params = {id(p): p for p in model.parameters()}  # tied tensors counted once
    embeddings = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Embedding) and not _is_tied_output(model, m)
    }
    if backbone(model) is model:  # a bare encoder outputs hidden states, not logits
        logits = int(config.hidden_size)
    else:
        logits = getattr(model, "num_labels", None) or getattr(config, "vocab_size", 1)
    return ModelShape(
        family=adapter.family,
        params=sum(p.numel() for p in params.values()),
        embedding_params=sum(params[i].numel() for i in embeddings if i in params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        hidden=int(config.hidden_size),
        head_dim=int(adapter.head_dim(model)),
        layers=tuple(
            LayerShape(x.num_heads, x.num_kv_heads, x.intermediate_size)
            for x in adapter.layout(model)
        ),
        logits_width=int(logits),
        decoder=adapter.is_decoder,
        eager_attention=getattr(config, "_attn_implementation", None) == "eager",
        fused_qkv_cache=adapter.fused_qkv_cache,
    )


def _is_tied_output(model: nn.Module, embedding: nn.Embedding) -> bool:
    """An embedding shared with an LM head is read in full every step."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return out is not None and getattr(out, "weight", None) is embedding.weight


# ---- checkpoints without weights ------------------------------------------------------------
def meta_model(path: str | Path):
    """The checkpoint's architecture with its per-layer shapes, on the meta device (no weights)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: not a checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    if getattr(config, "architectures", None):
        return build_on_meta(config, layouts=saved_layouts(config))
    with init_empty_weights(include_buffers=False):  # no class named: assume a classifier
        return AutoModelForSequenceClassification.from_config(config)


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def stored_dtype(model) -> str:
    dtype = getattr(model.config, "dtype", None) or next(model.parameters()).dtype
    return str(dtype).removeprefix("torch.")


def check_seq_len(model, seq_len: int, where: str) -> None:
    limit = max_positions(model.config)
    if limit is not None and seq_len > limit:
        raise ValueError(f"{where}: seq_len {seq_len} exceeds the model's {limit} positions")


# ---- memory -------------------------------------------------------------------------------------
def weight_bytes(shape: ModelShape, nbytes: int) -> int:
    return shape.params * nbytes + shape.buffer_bytes


def kv_cache_bytes(
    shape: ModelShape, batch: int, seq_len: int, nbytes: int, *, as_stored: bool = True
) -> int:
    """K/V bytes held for batch x seq_len tokens; as_stored=False: only K and V (what decode reads)."""
    if not shape.decoder:
        return 0
    fused = as_stored and shape.fused_qkv_cache
    per_token = sum(
        (2 * layer.num_kv_heads + (layer.num_heads if fused else 0)) * shape.head_dim
        for layer in shape.layers
    )
    return per_token * seq_len * batch * nbytes


def workspace_bytes(shape: ModelShape, batch: int, seq_len: int, nbytes: int) -> int:
    tokens = batch * seq_len
    per_layer = [0]
    for layer in shape.layers:
        attention = tokens * shape.head_dim * (3 * layer.num_heads + 2 * layer.num_kv_heads)
        if shape.eager_attention:
            attention += 2 * batch * layer.num_heads * seq_len * seq_len
        per_layer.append(max(attention, 3 * tokens * layer.intermediate_size))
    elements = 3 * tokens * shape.hidden + max(per_layer) + tokens * shape.logits_width
    mask = batch * seq_len * seq_len * (nbytes if shape.eager_attention else 1)
    return elements * nbytes + mask


def estimate_memory(shape: ModelShape, batch: int, seq_len: int, nbytes: int) -> MemoryEstimate:
    """Peak inference memory of one forward pass over batch x seq_len tokens."""
    return MemoryEstimate(
        weights=weight_bytes(shape, nbytes),
        kv_cache=kv_cache_bytes(shape, batch, seq_len, nbytes),
        workspace=workspace_bytes(shape, batch, seq_len, nbytes),
    )


def max_params_for_budget(budget: int, overhead_bytes: int, nbytes: int) -> int:
    """Largest parameter count whose weights fit in `budget` next to `overhead_bytes` (<= 0: none)."""
    return (budget - overhead_bytes) // nbytes


# ---- roofline -----------------------------------------------------------------------------------
def forward_flops(shape: ModelShape, batch: int, seq_len: int) -> float:
    """Model FLOPs of one forward pass (matmuls + attention scores/mixing; norms ignored)."""
    matmul_params = shape.params - shape.embedding_params
    attention = sum(
        4 * batch * seq_len * seq_len * layer.num_heads * shape.head_dim for layer in shape.layers
    )
    return 2.0 * matmul_params * batch * seq_len + attention


def bytes_read_per_step(shape: ModelShape, batch: int, seq_len: int, nbytes: int) -> int:
    """Weights a decode step streams from memory (embedding rows aside) plus the KV cache."""
    streamed = (shape.params - shape.embedding_params) * nbytes
    return streamed + kv_cache_bytes(shape, batch, seq_len, nbytes, as_stored=False)


def decode_tokens_per_s(
    shape: ModelShape, bandwidth: float, batch: int, seq_len: int, nbytes: int
) -> float:
    """Bandwidth bound on generated tokens/s with `batch` sequences at context `seq_len`."""
    return batch * bandwidth / bytes_read_per_step(shape, batch, seq_len, nbytes)


def classify_samples_per_s(
    shape: ModelShape, bandwidth: float, flops: float, batch: int, seq_len: int, nbytes: int
) -> float:
    """Roofline bound on classified sequences/s: one forward over batch x seq_len tokens."""
    compute_s = forward_flops(shape, batch, seq_len) / flops
    memory_s = weight_bytes(shape, nbytes) / bandwidth
    return batch / max(compute_s, memory_s)


def roofline(
    shape: ModelShape, bandwidth: float, flops: float, batch: int, seq_len: int, nbytes: int
) -> dict:
    """Device bounds: decode tokens/s (and x REALISM_FACTOR) and classified samples/s."""
    tokens = decode_tokens_per_s(shape, bandwidth, batch, seq_len, nbytes)
    return {
        "tokens_per_s": tokens,
        "tokens_per_s_realistic": tokens * REALISM_FACTOR,
        "samples_per_s": classify_samples_per_s(shape, bandwidth, flops, batch, seq_len, nbytes),
    }


def reduction(before: float | None, after: float | None) -> float | None:
    """Fractional reduction (0.42 means -42%); None when either side is unknown."""
    if not before or after is None:
        return None
    return round(1.0 - after / before, 4)
