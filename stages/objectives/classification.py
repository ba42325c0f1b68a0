"""Sequence classification: class logits against labels (the bearing-fault task)."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from stages.metrics import EvalResult, confusion_matrix, macro_f1
from stages.objectives.base import CachedOutputs, TeacherSpec, predict, register_objective
from stages.split import EncodedSplit, SplitError


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
) -> Tensor:
    """alpha * KL(teacher || student) * T^2 + (1 - alpha) * CE(student, labels)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
    if alpha >= 1.0:
        return kl
    return alpha * kl + (1.0 - alpha) * F.cross_entropy(student_logits.float(), labels)


@register_objective
class ClassificationObjective:
    """Cross-entropy on class logits; KD is KL to cached teacher logits (+ CE, weighted)."""

    name: ClassVar[str] = "classification"

    def outputs(self, model: nn.Module, batch: dict) -> Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, outputs: Tensor, batch: dict) -> Tensor:
        return F.cross_entropy(outputs.float(), batch["labels"])

    def importance_loss(self, model: nn.Module, batch: dict) -> Tensor:
        outputs = self.outputs(model, batch)
        return F.cross_entropy(outputs.float(), batch["labels"], reduction="sum")

    def kd_loss(
        self, outputs: Tensor, teacher: Tensor, batch: dict, *, temperature: float, alpha: float
    ) -> Tensor:
        teacher = teacher.detach().to(outputs.device)
        if teacher.shape != outputs.shape:
            raise ValueError(
                f"kd: teacher logits shape {tuple(teacher.shape)} != student {tuple(outputs.shape)}"
            )
        return kd_loss(outputs, teacher, batch["labels"], temperature=temperature, alpha=alpha)

    def make_teacher(
        self, model: nn.Module, split: EncodedSplit, spec: TeacherSpec | None = None
    ) -> CachedOutputs:
        """The class logits of every row, whole (a few per row: nothing to truncate)."""
        return CachedOutputs(predict(model, split, self.outputs))

    def evaluate(
        self, model: nn.Module, split: EncodedSplit, *, num_labels: int | None = None
    ) -> EvalResult:
        """Accuracy, macro-F1, mean loss and confusion matrix; restores the model's mode."""
        if len(split) == 0:
            raise SplitError("evaluate: split is empty")
        logits = predict(model, split, self.outputs)
        labels = split.labels
        config = getattr(model, "config", None)
        k = num_labels or int(getattr(config, "num_labels", None) or logits.shape[-1])
        preds = logits.argmax(dim=-1)
        conf = confusion_matrix(labels, preds, max(k, int(labels.max()) + 1, logits.shape[-1]))
        return EvalResult(
            accuracy=float((preds == labels).double().mean()),
            macro_f1=macro_f1(conf),
            loss=float(F.cross_entropy(logits, labels)),
            confusion=conf.tolist(),
            n=len(split),
        )
