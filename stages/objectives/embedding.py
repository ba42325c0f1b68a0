"""Sentence embeddings of a bare encoder, distilled from the dense model's embeddings.

Every split row carries the dense model's L2-normalised mean-pooled embedding as `targets`. Two
objectives, because one cannot serve both uses:

* `loss` (recovery, evaluation): mean(1 - cos(student, dense)) + KL between the dense and the
  student in-batch similarity distributions. Both terms are zero exactly at the dense model, so
  recovery pulls the student towards the dense embeddings and nowhere else.
* `importance_loss` (importance, SIA, loss_delta): the cosine gap + an in-batch contrastive term
  (each row must pick its own dense embedding among the batch's). Any loss minimised at the dense
  model has a zero gradient there, which would make first-order (Taylor) scores and the SIA
  stability check meaningless; the contrastive term is not flat, and its gradient says which
  components keep sentences distinguishable. It is not trained on: a student can beat the dense
  model on it by spreading sentences the dense model keeps close, i.e. by moving away from it.

The in-batch terms need >= 2 rows per batch (checked by the job config). Under Ray Train DDP the
batch is each worker's share of the global batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.metrics import EvalResult, confusion_matrix, macro_f1
from stages.objectives.base import predict, register_objective
from stages.split import EncodedSplit, SplitError

CONTRASTIVE_TEMPERATURE = 0.05


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the token states that are not padding (sentence-transformers' mean pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


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


def cosine_to_targets(embeddings: Tensor, targets: Tensor) -> Tensor:
    """Per-row cosine similarity between two sets of embeddings."""
    return F.cosine_similarity(embeddings.float(), targets.float(), dim=-1)


def nearest_neighbour_predictions(embeddings: Tensor, labels: Tensor) -> Tensor:
    """Leave-one-out 1-NN: each row gets the label of its most similar other row (cosine)."""
    unit = F.normalize(embeddings.float(), dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(float("-inf"))
    return labels[similarity.argmax(dim=-1)]


@register_objective
class EmbeddingObjective:
    """Mean-pooled, L2-normalised sentence embeddings matched to the dense model's (`targets`)."""

    name: ClassVar[str] = "embedding"

    def outputs(self, model: nn.Module, batch: dict) -> Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pooled = mean_pool(out.last_hidden_state.float(), batch["attention_mask"])
        return F.normalize(pooled, dim=-1)

    def loss(self, outputs: Tensor, batch: dict) -> Tensor:
        return embedding_loss(outputs, batch["targets"])

    def importance_loss(self, model: nn.Module, batch: dict) -> Tensor:
        outputs = self.outputs(model, batch)
        return embedding_sensitivity_loss(outputs, batch["targets"], reduction="sum")

    def kd_loss(self, outputs, teacher, batch, *, temperature, alpha) -> Tensor:
        raise ValueError(
            "embedding recovery always distils the dense embeddings; loss kd is not defined here"
        )

    def make_teacher(self, model: nn.Module, split: EncodedSplit, spec=None):
        raise ValueError("the embedding task's teacher is the dense embeddings its splits carry")

    def dense_targets(self, model: nn.Module, split: EncodedSplit) -> EncodedSplit:
        """The split carrying the (dense) model's embeddings as the targets to distil."""
        return split.with_targets(predict(model, split, self.outputs))

    def evaluate(self, model: nn.Module, split: EncodedSplit) -> EvalResult:
        """Cosine to the dense embeddings, and leave-one-out 1-NN fault accuracy (EvalResult)."""
        if split.targets is None:
            raise SplitError("evaluate: an embedding split must carry the dense embeddings")
        if len(split) < 2:
            raise SplitError("evaluate: an embedding split needs at least 2 rows (1-NN accuracy)")
        embeddings = predict(model, split, self.outputs)
        labels = split.labels
        preds = nearest_neighbour_predictions(embeddings, labels)
        conf = confusion_matrix(labels, preds, int(labels.max()) + 1)
        return EvalResult(
            accuracy=float((preds == labels).double().mean()),
            macro_f1=macro_f1(conf),
            loss=float(embedding_loss(embeddings, split.targets)),
            confusion=conf.tolist(),
            n=len(split),
            cosine=float(cosine_to_targets(embeddings, split.targets).mean()),
        )
