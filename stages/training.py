"""The one training / evaluation loop shared by recovery, demo training and baselines.

Splits are tokenised once into in-memory tensors (the demo texts are short), so every
stage trains and evaluates on exactly the same token ids without re-tokenising.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.objective import (
    cosine_to_targets,
    embedding_loss,
    model_outputs,
    nearest_neighbour_predictions,
    task_loss,
)

__all__ = [
    "EncodedSplit",
    "EvalResult",
    "TrainSettings",
    "TrainingError",
    "encode_split",
    "evaluate",
    "kd_loss",
    "lr_multiplier",
    "macro_f1",
    "confusion_matrix",
    "predict",
    "train_steps",
]


class TrainingError(ValueError):
    """A training or evaluation input is unusable (bad settings, empty split, NaN loss)."""


# ----------------------------------------------------------------------------- data


@dataclass
class EncodedSplit:
    """A dataset split tokenised once and kept as tensors (padded to the split's longest)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    targets: Tensor | None = None  # dense-model embeddings per row (embedding task)

    def __post_init__(self) -> None:
        n = self.input_ids.shape[0]
        bad_targets = self.targets is not None and self.targets.shape[0] != n
        if (
            self.attention_mask.shape != self.input_ids.shape
            or self.labels.shape != (n,)
            or bad_targets
        ):
            raise TrainingError(
                "EncodedSplit: shapes disagree "
                f"(input_ids {tuple(self.input_ids.shape)}, attention_mask "
                f"{tuple(self.attention_mask.shape)}, labels {tuple(self.labels.shape)}"
                + (f", targets {tuple(self.targets.shape)})" if self.targets is not None else ")")
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, idx: Tensor | Iterable[int] | slice) -> EncodedSplit:
        """Rows `idx` (indices, bool mask or slice) as a new split."""
        if not isinstance(idx, (Tensor, slice)):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        targets = self.targets[idx] if self.targets is not None else None
        return EncodedSplit(
            self.input_ids[idx], self.attention_mask[idx], self.labels[idx], targets
        )

    def with_targets(self, targets: Tensor) -> EncodedSplit:
        """The same rows, carrying the dense model's embeddings (switches losses to distillation)."""
        return EncodedSplit(self.input_ids, self.attention_mask, self.labels, targets)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        """Yield batches; columns that are padding in every row of a batch are trimmed."""
        if batch_size < 1:
            raise TrainingError(f"EncodedSplit.batches: batch_size must be >= 1, got {batch_size}")
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            mask = self.attention_mask[rows]
            used = mask.any(dim=0).nonzero()
            lo, hi = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, mask.shape[1])
            batch = {
                "input_ids": self.input_ids[rows, lo:hi],
                "attention_mask": mask[:, lo:hi],
                "labels": self.labels[rows],
                "index": rows,  # row positions in this split (cached teacher logits use them)
            }
            if self.targets is not None:
                batch["targets"] = self.targets[rows]
            yield batch


def encode_split(dataset: Any, tokenizer: Any, max_length: int = 96) -> EncodedSplit:
    """Tokenise a split with "text"/"label" columns, padding to its longest text."""
    for column in ("text", "label"):
        if column not in dataset.column_names:
            raise TrainingError(f"encode_split: dataset has no {column!r} column")
    if len(dataset) == 0:
        raise TrainingError("encode_split: dataset split is empty")
    if tokenizer.pad_token_id is None:
        raise TrainingError("encode_split: tokenizer has no pad token (set tokenizer.pad_token)")
    enc = tokenizer(
        list(dataset["text"]),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    labels = torch.as_tensor(list(dataset["label"]), dtype=torch.long)
    return EncodedSplit(enc["input_ids"].long(), enc["attention_mask"].long(), labels)


# ----------------------------------------------------------------------------- metrics


@dataclass
class EvalResult:
    """Metrics of one model on one split.

    Embedding task: accuracy/macro-F1/confusion are leave-one-out 1-NN fault classification with
    the embeddings, and `cosine` is the mean cosine similarity to the dense model's embeddings.
    """

    accuracy: float
    macro_f1: float
    loss: float
    confusion: list[list[int]]  # confusion[true][predicted]
    n: int
    cosine: float | None = None


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


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _num_labels(model: nn.Module, explicit: int | None, logits_width: int) -> int:
    if explicit is not None:
        return explicit
    config = getattr(model, "config", None)
    return int(getattr(config, "num_labels", None) or logits_width)


def evaluate(
    model: nn.Module, split: EncodedSplit, *, batch_size: int = 64, num_labels: int | None = None
) -> EvalResult:
    """Accuracy, macro-F1, mean loss and confusion matrix; restores the model's mode.

    A split carrying dense embeddings (`targets`) is scored as an embedding model (see EvalResult).
    """
    if len(split) == 0:
        raise TrainingError("evaluate: split is empty")
    logits = predict(model, split, batch_size=batch_size)
    labels = split.labels
    if split.targets is not None:
        return _evaluate_embeddings(logits, split)
    k = _num_labels(model, num_labels, logits.shape[-1])
    preds = logits.argmax(dim=-1)
    conf = confusion_matrix(labels, preds, max(k, int(labels.max()) + 1, logits.shape[-1]))
    return EvalResult(
        accuracy=float((preds == labels).double().mean()),
        macro_f1=macro_f1(conf),
        loss=float(F.cross_entropy(logits, labels)),
        confusion=conf.tolist(),
        n=len(split),
    )


def predict(model: nn.Module, split: EncodedSplit, *, batch_size: int = 64) -> Tensor:
    """Logits (classifier) or normalised embeddings (bare encoder) for every row, on the CPU."""
    device = _model_device(model)
    was_training = model.training
    model.eval()
    outputs: list[Tensor] = []
    try:
        with torch.no_grad():
            for batch in split.batches(batch_size):
                batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
                outputs.append(model_outputs(model, batch).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs)


def _evaluate_embeddings(embeddings: Tensor, split: EncodedSplit) -> EvalResult:
    assert split.targets is not None
    if len(split) < 2:
        raise TrainingError("evaluate: an embedding split needs at least 2 rows (1-NN accuracy)")
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


# ----------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    """Optimiser, schedule and loss of one training run (kd = distillation from a teacher)."""

    steps: int
    lr: float = 3e-4
    batch_size: int = 16
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    loss: Literal["ce", "kd"] = "ce"
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5  # kd loss = alpha*KL(teacher||student)*T^2 + (1-alpha)*CE
    schedule: Literal["cosine", "linear"] = "cosine"

    def validate(self) -> None:
        """Raise TrainingError naming the first bad field."""
        checks = [
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 <= self.warmup_fraction <= 1, "warmup_fraction must be in [0, 1]"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)"),
            (self.loss in ("ce", "kd"), f"loss must be 'ce' or 'kd', got {self.loss!r}"),
            (self.kd_temperature > 0, "kd_temperature must be > 0"),
            (0 <= self.kd_alpha <= 1, "kd_alpha must be in [0, 1]"),
            (self.schedule in ("cosine", "linear"), f"unknown schedule {self.schedule!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(f"TrainSettings: {message}")


def lr_multiplier(step: int, total: int, warmup_fraction: float, schedule: str = "cosine") -> float:
    """Linear warmup to 1, then cosine or linear decay to 0 at `total` steps."""
    warmup = int(round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    remaining = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / remaining)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


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


def _endless_batches(
    split: EncodedSplit, batch_size: int, seed: int
) -> Iterator[dict[str, Tensor]]:
    epoch = 0
    while True:
        yield from split.batches(batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


def train_steps(
    model: nn.Module,
    split: EncodedSplit,
    settings: TrainSettings,
    *,
    teacher_logits: Callable[[dict], Tensor] | None = None,
    params: Iterable[nn.Parameter] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `settings.steps` AdamW steps on shuffled batches; return per-step losses.

    Deterministic under `settings.seed` (batch order and dropout RNG, without disturbing
    the caller's global RNG). `teacher_logits(batch)` is called under no_grad with the
    batch already on the model's device; the model's train/eval mode is restored afterwards.
    """
    settings.validate()
    if settings.loss == "kd" and teacher_logits is None:
        raise TrainingError("train_steps: loss='kd' needs a teacher_logits callable")
    if len(split) == 0:
        raise TrainingError("train_steps: training split is empty")
    trainable = [p for p in (params if params is not None else model.parameters())]
    trainable = [p for p in trainable if p.requires_grad]
    if not trainable:
        raise TrainingError("train_steps: no trainable parameters (all have requires_grad=False)")
    if settings.steps == 0:
        return []

    device = _model_device(model)
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, settings.steps, settings.warmup_fraction, settings.schedule
        ),
    )
    # Fork the CPU RNG (and the model's CUDA device) so seeding here leaves the caller's alone.
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(settings.seed)
            batches = _endless_batches(split, settings.batch_size, settings.seed)
            for step in range(settings.steps):
                batch = {k: v.to(device) for k, v in next(batches).items()}
                loss = _batch_loss(model, batch, settings, teacher_logits)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(f"train_steps: loss is {value} at step {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(value)
                if on_step is not None:
                    on_step(step, value)
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    return losses


def _batch_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    settings: TrainSettings,
    teacher_logits: Callable[[dict], Tensor] | None,
) -> Tensor:
    logits = model_outputs(model, batch)
    if settings.loss == "ce":
        return task_loss(logits, batch)
    assert teacher_logits is not None
    with torch.no_grad():
        target = teacher_logits(batch).detach().to(logits.device)
    if target.shape != logits.shape:
        raise TrainingError(
            f"train_steps: teacher logits shape {tuple(target.shape)} != student "
            f"{tuple(logits.shape)}"
        )
    return kd_loss(
        logits,
        target,
        batch["labels"],
        temperature=settings.kd_temperature,
        alpha=settings.kd_alpha,
    )
