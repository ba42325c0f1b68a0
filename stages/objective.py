"""What a model is asked to do: classify (logits vs labels) or embed (match the dense embeddings).

Every loss the runner takes a gradient of (importance, SIA, recovery, Ray Train) goes through
`task_loss`, so a batch carrying "targets" (the dense model's embeddings) switches the whole
cascade to embedding distillation without any stage knowing the task.

Embedding loss = mean(1 - cos(student, dense)) + contrastive term. The cosine term alone is
flat at the dense model (its gradient is exactly zero there), which would make first-order
(Taylor) importance and the SIA stability check meaningless; the contrastive term -- each row
must pick its own dense embedding among the batch's -- is not, and it keeps the geometry that
retrieval relies on. The negatives are the other rows of the same batch: under Ray Train DDP that
is each worker's share of the global batch, so N workers see N-times fewer negatives per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CONTRASTIVE_TEMPERATURE = 0.05


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the token states that are not padding (sentence-transformers' mean pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


def model_outputs(model, batch: dict) -> Tensor:
    """Logits of a task head, or the L2-normalised mean-pooled sentence embedding of a bare encoder."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    pooled = mean_pool(out.last_hidden_state.float(), batch["attention_mask"])
    return F.normalize(pooled, dim=-1)


def embedding_loss(student: Tensor, dense: Tensor, *, reduction: str = "mean") -> Tensor:
    """(1 - cosine to the dense embedding) + in-batch contrastive distillation, per row."""
    student = F.normalize(student.float(), dim=-1)
    dense = F.normalize(dense.float().to(student.device), dim=-1)
    cosine_gap = 1.0 - (student * dense).sum(dim=-1)
    similarities = student @ dense.T / CONTRASTIVE_TEMPERATURE
    own = torch.arange(student.shape[0], device=student.device)
    contrastive = F.cross_entropy(similarities, own, reduction="none")
    per_row = cosine_gap + contrastive
    return per_row.sum() if reduction == "sum" else per_row.mean()


def task_loss(outputs: Tensor, batch: dict, *, reduction: str = "mean") -> Tensor:
    """Embedding distillation when the batch has dense "targets", else cross-entropy on labels."""
    if "targets" in batch:
        return embedding_loss(outputs, batch["targets"], reduction=reduction)
    return F.cross_entropy(outputs.float(), batch["labels"], reduction=reduction)


def summed_loss(model, batch: dict) -> Tensor:
    """Loss summed over the batch's rows (shards of fixed micro-batches add up exactly)."""
    return task_loss(model_outputs(model, batch), batch, reduction="sum")


def cosine_to_targets(embeddings: Tensor, targets: Tensor) -> Tensor:
    """Per-row cosine similarity between two sets of embeddings."""
    return F.cosine_similarity(embeddings.float(), targets.float(), dim=-1)


def nearest_neighbour_predictions(embeddings: Tensor, labels: Tensor) -> Tensor:
    """Leave-one-out 1-NN: each row gets the label of its most similar other row (cosine)."""
    if embeddings.shape[0] < 2:
        raise ValueError("nearest-neighbour accuracy needs at least 2 rows")
    unit = F.normalize(embeddings.float(), dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(float("-inf"))
    return labels[similarity.argmax(dim=-1)]
