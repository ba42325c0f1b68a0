"""Tiny, seeded Hugging Face models built from configs (no hub, no network) for fast CPU tests.

Weights use a larger init range than the HF default so that pruning a unit visibly changes the
logits: an equality test on near-zero activations could not fail.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

VOCAB_SIZE = 100
PAD_ID = 0
NUM_LABELS = 3
INIT_RANGE = 0.2

_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "pad_token_id": PAD_ID,
    "num_labels": NUM_LABELS,
    "initializer_range": INIT_RANGE,
}


def _build(cls: type[PreTrainedModel], config, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = cls(config)
    _randomise_norms(model, seed)
    return model.eval()


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at exactly 1 and biases at 0; jitter them so slicing bugs show."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            lowered = name.lower()
            if "norm" in lowered or "ln_" in lowered:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def tiny_gpt2(
    cls: type[PreTrainedModel] = GPT2ForSequenceClassification,
    *,
    attn_implementation: str = "eager",
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """GPT-2 (Conv1D, fused c_attn): hidden 32, 4 heads of 8, 3 layers, FFN 48."""
    kwargs = dict(
        _COMMON,
        n_embd=32,
        n_head=4,
        n_layer=3,
        n_inner=48,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=attn_implementation,
    )
    kwargs.update(overrides)
    return _build(cls, GPT2Config(**kwargs), seed)


def tiny_bert(
    cls: type[PreTrainedModel] = BertForSequenceClassification,
    *,
    attn_implementation: str = "eager",
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """BERT (post-LN, biased Linear): hidden 32, 4 heads of 8, 3 layers, FFN 48."""
    kwargs = dict(
        _COMMON,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=3,
        intermediate_size=48,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn_implementation,
    )
    kwargs.update(overrides)
    return _build(cls, BertConfig(**kwargs), seed)


def _llama_kwargs(num_heads: int, num_kv_heads: int, attn_implementation: str) -> dict:
    return dict(
        _COMMON,
        hidden_size=32,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=32 // num_heads,
        num_hidden_layers=3,
        intermediate_size=48,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )


def tiny_llama(
    cls: type[PreTrainedModel] = LlamaForSequenceClassification,
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    attn_implementation: str = "eager",
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """Llama (GQA + SwiGLU): hidden 32, 4 query heads in 2 KV groups, 3 layers, FFN 48."""
    kwargs = _llama_kwargs(num_heads, num_kv_heads, attn_implementation)
    kwargs.update(overrides)
    return _build(cls, LlamaConfig(**kwargs), seed)


def tiny_qwen2(
    cls: type[PreTrainedModel] = Qwen2ForSequenceClassification,
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    attn_implementation: str = "eager",
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """Qwen2 (q/k/v bias): layer 0 full attention, layers 1-2 sliding window 4 (layer_types)."""
    kwargs = _llama_kwargs(num_heads, num_kv_heads, attn_implementation)
    kwargs.pop("head_dim")  # Qwen2Config has no head_dim field: derived from hidden/heads
    kwargs.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    kwargs.update(overrides)
    return _build(cls, Qwen2Config(**kwargs), seed)


def tiny_mistral(
    cls: type[PreTrainedModel] = MistralForSequenceClassification,
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    attn_implementation: str = "eager",
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """Mistral (GQA, global sliding window 6)."""
    kwargs = _llama_kwargs(num_heads, num_kv_heads, attn_implementation)
    kwargs.update(sliding_window=6)
    kwargs.update(overrides)
    return _build(cls, MistralConfig(**kwargs), seed)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over VOCAB_SIZE tokens: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, w4.. ."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB_SIZE)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]"
    )


def padded_batch(
    *, batch: int = 3, seq_len: int = 9, side: str = "right", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (never the pad id) with a different length per row, padded on `side`.

    Returns (input_ids, attention_mask); row 0 is full length so every position is exercised.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padded_batch: side must be 'left' or 'right', got {side!r}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB_SIZE, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row in range(1, batch):
        pad = min(2 * row, seq_len - 2)
        if side == "right":
            mask[row, seq_len - pad :] = 0
        else:
            mask[row, :pad] = 0
    ids = ids.masked_fill(mask == 0, PAD_ID)
    return ids, mask


# ---- more architectures (OPT, GPT-NeoX, Qwen3, RoBERTa/XLM-R, DistilBERT, Phi-3) -------------
def _randomise_biases(model: torch.nn.Module, seed: int) -> None:
    """Linear biases start at 0; jitter them so a bias that is sliced wrongly changes outputs."""
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))


def _build_biased(cls: type[PreTrainedModel], config, seed: int) -> PreTrainedModel:
    model = _build(cls, config, seed)
    _randomise_biases(model, seed)
    return model


def tiny_opt(cls=None, *, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """OPT (pre-LN, biased q/k/v/out_proj, ReLU fc1/fc2): hidden 32, 4 heads, 3 layers, FFN 48."""
    from transformers import OPTConfig, OPTForSequenceClassification

    kwargs = dict(
        _COMMON,
        hidden_size=32,
        word_embed_proj_dim=32,
        num_attention_heads=4,
        num_hidden_layers=3,
        ffn_dim=48,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
        init_std=INIT_RANGE,
        attn_implementation=attn_implementation,
    )
    kwargs.update(overrides)
    return _build_biased(cls or OPTForSequenceClassification, OPTConfig(**kwargs), seed)


def tiny_neox(cls=None, *, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """GPT-NeoX (fused per-head q|k|v, partial rotary 50%, parallel residual): like tiny_gpt2."""
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    kwargs = dict(
        _COMMON,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=3,
        intermediate_size=48,
        max_position_embeddings=64,
        rotary_pct=0.5,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=attn_implementation,
    )
    kwargs.update(overrides)
    return _build_biased(cls or GPTNeoXForSequenceClassification, GPTNeoXConfig(**kwargs), seed)


def tiny_qwen3(cls=None, *, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """Qwen3 (GQA 4/2, q_norm/k_norm over head_dim 8): layer 0 full, layers 1-2 sliding window 4."""
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    kwargs = _llama_kwargs(4, 2, attn_implementation)
    kwargs.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    kwargs.update(overrides)
    return _build(cls or Qwen3ForSequenceClassification, Qwen3Config(**kwargs), seed)


def _encoder_kwargs(attn_implementation: str) -> dict:
    return dict(
        _COMMON,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=3,
        intermediate_size=48,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn_implementation,
    )


def tiny_roberta(cls=None, *, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """RoBERTa (BERT modules, padding-aware positions, dense+out_proj head): like tiny_bert."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    kwargs = _encoder_kwargs(attn_implementation)
    kwargs.update(overrides)
    return _build_biased(cls or RobertaForSequenceClassification, RobertaConfig(**kwargs), seed)


def tiny_xlm_roberta(cls=None, *, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """XLM-RoBERTa: RoBERTa's modules under model_type 'xlm-roberta'."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    kwargs = _encoder_kwargs(attn_implementation)
    kwargs.update(overrides)
    return _build_biased(
        cls or XLMRobertaForSequenceClassification, XLMRobertaConfig(**kwargs), seed
    )


def tiny_distilbert(cls=None, *, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """DistilBERT (q_lin/k_lin/v_lin/out_lin, lin1/lin2, pre_classifier): dim 32, 4 heads, FFN 48."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    kwargs = dict(
        _COMMON,
        dim=32,
        n_heads=4,
        n_layers=3,
        hidden_dim=48,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
        attn_implementation=attn_implementation,
    )
    kwargs.update(overrides)
    return _build_biased(
        cls or DistilBertForSequenceClassification, DistilBertConfig(**kwargs), seed
    )


def tiny_phi3(cls=None, *, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """Phi-3/Phi-4-mini style: fused qkv_proj (GQA 4/2) and gate_up_proj, partial rotary 0.5."""
    from transformers import Phi3Config, Phi3ForSequenceClassification

    kwargs = _llama_kwargs(4, 2, attn_implementation)
    kwargs.update(partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0)
    kwargs.update(overrides)
    return _build(cls or Phi3ForSequenceClassification, Phi3Config(**kwargs), seed)


def prune_uniformly(model, *, heads: bool):
    """Every layer the same shape: keep head/unit 1 (if heads), channels 5..36, drop layer 2."""
    from stages.arch import get_adapter

    adapter = get_adapter(model)
    for i in range(3):
        if heads:
            adapter.prune_attention(model, i, [1])
        adapter.prune_mlp(model, i, list(range(5, 37)))
    adapter.remove_layers(model, [2])
    return model


def prune_units(adapter, model, attn_keep: dict, mlp_keep: dict) -> int:
    """Slice the kept units per layer; returns the parameter drop the adapter's unit costs predict."""
    expected = sum(
        (adapter.attn_units(model, i) - len(k)) * adapter.attn_unit_cost(model, i)
        for i, k in attn_keep.items()
    ) + sum(
        (adapter.mlp_units(model, i) - len(k)) * adapter.mlp_unit_cost(model, i)
        for i, k in mlp_keep.items()
    )
    for i, keep in attn_keep.items():
        adapter.prune_attention(model, i, keep)
    for i, keep in mlp_keep.items():
        adapter.prune_mlp(model, i, keep)
    return expected
