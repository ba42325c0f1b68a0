"""What a model is asked to do: classify (logits vs labels) or embed (match the dense embeddings).

A batch carrying "targets" (the dense model's embeddings) switches every loss to the embedding
task without any stage knowing the task. Two objectives, because one cannot serve both uses:

* `task_loss` (recovery, evaluation): mean(1 - cos(student, dense)) + KL between the dense and the
  student in-batch similarity distributions. Both terms are zero exactly at the dense model, so
  recovery pulls the student towards the dense embeddings and nowhere else.
* `summed_loss` (importance, SIA, loss_delta): the cosine gap + an in-batch contrastive term (each
  row must pick its own dense embedding among the batch's). Any loss minimised at the dense model
  has a zero gradient there, which would make first-order (Taylor) scores and the SIA stability
  check meaningless; the contrastive term is not flat, and its gradient says which components keep
  sentences distinguishable. It is not used for training: a student can beat the dense model on it
  by spreading sentences the dense model keeps close, i.e. by moving away from it.

The in-batch terms need >= 2 rows per batch (checked by the job config). Under Ray Train DDP the
batch is each worker's share of the global batch.
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


def _unit_pair(student: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
    student = F.normalize(student.float(), dim=-1)
    return student, F.normalize(dense.float().to(student.device), dim=-1)


def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    return per_row.sum() if reduction == "sum" else per_row.mean()


def embedding_loss(student: Tensor, dense: Tensor, *, reduction: str = "mean") -> Tensor:
    """Distillation, zero exactly at the dense embeddings: cosine gap + relational KL, per row."""
    student, dense = _unit_pair(student, dense)
    cosine_gap = 1.0 - (student * dense).sum(dim=-1)
    teacher = F.log_softmax(dense @ dense.T / CONTRASTIVE_TEMPERATURE, dim=-1)
    mimic = F.log_softmax(student @ dense.T / CONTRASTIVE_TEMPERATURE, dim=-1)
    relational = (teacher.exp() * (teacher - mimic)).sum(dim=-1)
    return _reduce(cosine_gap + relational, reduction)


def embedding_sensitivity_loss(
    student: Tensor, dense: Tensor, *, reduction: str = "mean"
) -> Tensor:
    """Importance objective, not flat at the dense model: cosine gap + in-batch contrastive, per row."""
    student, dense = _unit_pair(student, dense)
    cosine_gap = 1.0 - (student * dense).sum(dim=-1)
    own = torch.arange(student.shape[0], device=student.device)
    contrastive = F.cross_entropy(
        student @ dense.T / CONTRASTIVE_TEMPERATURE, own, reduction="none"
    )
    return _reduce(cosine_gap + contrastive, reduction)


def task_loss(outputs: Tensor, batch: dict, *, reduction: str = "mean") -> Tensor:
    """Training/evaluation loss: embedding distillation with dense "targets", else CE on labels."""
    if "targets" in batch:
        return embedding_loss(outputs, batch["targets"], reduction=reduction)
    return F.cross_entropy(outputs.float(), batch["labels"], reduction=reduction)


def summed_loss(model, batch: dict) -> Tensor:
    """Importance loss summed over the batch's rows (shards of fixed micro-batches add up exactly)."""
    outputs = model_outputs(model, batch)
    if "targets" in batch:
        return embedding_sensitivity_loss(outputs, batch["targets"], reduction="sum")
    return F.cross_entropy(outputs.float(), batch["labels"], reduction="sum")


def cosine_to_targets(embeddings: Tensor, targets: Tensor) -> Tensor:
    """Per-row cosine similarity between two sets of embeddings."""
    return F.cosine_similarity(embeddings.float(), targets.float(), dim=-1)


def nearest_neighbour_predictions(embeddings: Tensor, labels: Tensor) -> Tensor:
    """Leave-one-out 1-NN: each row gets the label of its most similar other row (cosine)."""
    unit = F.normalize(embeddings.float(), dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(float("-inf"))
    return labels[similarity.argmax(dim=-1)]
