"""Metrics of one model on one split: the result type and the classification arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EvalResult:
    """Metrics of one model on one split.

    Classification: accuracy, macro-F1, confusion[true][predicted]. Embedding task: the same as
    leave-one-out 1-NN fault classification with the embeddings, and `cosine`, the mean cosine
    similarity to the dense model's embeddings. Causal LM: `accuracy` is next-token top-1
    accuracy, `loss` the mean NLL per token, `perplexity` exp(loss) over `tokens` predictions.
    """

    accuracy: float
    macro_f1: float | None
    loss: float
    confusion: list[list[int]] | None
    n: int
    cosine: float | None = None
    perplexity: float | None = None
    tokens: int | None = None


def confusion_matrix(labels: Tensor, preds: Tensor, num_labels: int) -> Tensor:
    """Counts [true, predicted] as a num_labels x num_labels long tensor."""
    flat = labels.long() * num_labels + preds.long()
    return torch.bincount(flat, minlength=num_labels * num_labels).view(num_labels, num_labels)


def macro_f1(confusion: Tensor) -> float:
    """Mean per-class F1 over classes that occur in the labels or the predictions.

    Same convention as sklearn's default (labels = union of y_true and y_pred).
    """
    conf = confusion.double()
    tp = conf.diagonal()
    support = conf.sum(dim=1)
    predicted = conf.sum(dim=0)
    present = (support + predicted) > 0
    if not bool(present.any()):
        return 0.0
    f1 = 2 * tp / (support + predicted).clamp_min(1)
    return float(f1[present].mean())
