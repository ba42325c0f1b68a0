"""Perplexity of a causal decoder's backbone through a language-model head, on plain token ids.

The runner prunes classifiers built on causal LMs; their backbone still produces next-token
hidden states (pruning never changes the hidden size), so the source checkpoint's LM head reads
them. How much general language modelling survives a cascade is exactly what this measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.arch.base import backbone


def token_windows(ids: Tensor, window: int, bos: int | None = None) -> list[Tensor]:
    """Non-overlapping windows of `window` tokens, each opened by `bos` when given (as a model
    sees the start of a document); a window with fewer than 2 tokens predicts nothing."""
    if window < 2 + (bos is not None):
        raise ValueError(
            f"perplexity window must be >= {2 + (bos is not None)} tokens, got {window}"
        )
    step = window - (bos is not None)
    chunks = [ids[start : start + step] for start in range(0, ids.numel(), step)]
    if bos is not None:
        chunks = [torch.cat([torch.tensor([bos], dtype=ids.dtype), c]) for c in chunks]
    return [c for c in chunks if c.numel() >= 2]


def next_token_nll(logits: Tensor, ids: Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given logits[:-1], and how many tokens that is."""
    nll = F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum")
    return float(nll), int(ids.numel() - 1)


def perplexity(
    model,
    head: Callable[[Tensor], Tensor],
    ids: Tensor,
    *,
    window: int,
    bos: int | None = None,
    batch_size: int = 8,
) -> dict:
    """exp(mean next-token NLL) over non-overlapping windows (no context carried between them)."""
    chunks = token_windows(ids, window, bos)
    if not chunks:
        raise ValueError("perplexity: the text has fewer than 2 tokens")
    body = backbone(model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(chunks), batch_size):
                group = chunks[start : start + batch_size]
                width = max(c.numel() for c in group)
                batch = torch.zeros(len(group), width, dtype=torch.long)
                mask = torch.zeros(len(group), width, dtype=torch.long)
                for row, chunk in enumerate(group):  # right padding: causal rows ignore it
                    batch[row, : chunk.numel()] = chunk
                    mask[row, : chunk.numel()] = 1
                hidden = body(input_ids=batch.to(device), attention_mask=mask.to(device))
                logits = head(hidden.last_hidden_state).cpu()
                for row, chunk in enumerate(group):
                    nll, n = next_token_nll(logits[row, : chunk.numel()], chunk)
                    total, count = total + nll, count + n
    finally:
        model.train(was_training)
    mean = total / count
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": count}
