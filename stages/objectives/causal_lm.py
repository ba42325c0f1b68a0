"""Causal language modelling: next-token cross-entropy, and KL to a teacher's top-k distribution.

Batches are packed text blocks (right-padded only when a block is the last, partial one): the
token at position t predicts token t + 1 wherever both are real tokens.

The KD teacher is held as its TOP-K next-token logits per position, cached once: k = 32 costs
32 x (2 B fp16 value + 4 B int32 index) = 192 B per token, against 4 B x vocabulary for the full
distribution (196 KB per token for SmolLM2's 49,152 tokens: 1,000 blocks of 256 tokens would be
50 GB). The teacher distribution is renormalised over its top k (the tail it drops holds little
mass for a trained LM), and the student is compared on those k tokens: KL(p_teacher || p_student)
restricted to them, x T^2, plus (1 - alpha) x the next-token CE. Running the teacher on the fly
instead would hold a second model copy (4 B x parameters: 540 MB for 135M in fp32) and cost one
teacher forward per step; the cache costs one pass over the training blocks, once per stage.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.metrics import EvalResult
from stages.objectives.base import model_device, register_objective
from stages.split import EncodedSplit, SplitError

KD_TOP_K = 32


def next_token_targets(batch: dict) -> tuple[Tensor, Tensor]:
    """(targets [B, T-1], mask [B, T-1]): position t predicts t + 1 where both are real tokens."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    return ids[:, 1:], mask[:, 1:] & mask[:, :-1]


def token_nll(logits: Tensor, batch: dict) -> tuple[Tensor, Tensor]:
    """(per-position NLL [B, T-1] in float32, valid mask [B, T-1]) of the next tokens."""
    targets, valid = next_token_targets(batch)
    scores = logits[:, :-1].float()
    nll = F.cross_entropy(
        scores.reshape(-1, scores.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return nll.view_as(targets) * valid, valid


class CachedTopK:
    """A teacher's top-k next-token logits per training row and position (see module docstring).

    Blocks are right-padded, so a batch's trimmed columns are a prefix of the cached ones.
    Picklable: Ray Train workers receive it with their split.
    """

    def __init__(self, values: Tensor, indices: Tensor):
        self.values, self.indices = values, indices

    def __call__(self, batch: dict) -> tuple[Tensor, Tensor]:
        rows, width = batch["index"].cpu(), batch["input_ids"].shape[1]
        return self.values[rows, :width], self.indices[rows, :width]

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.indices.nbytes


def topk_kl(
    student_logits: Tensor, teacher: tuple[Tensor, Tensor], valid: Tensor, temperature: float
) -> Tensor:
    """Mean over valid positions of KL(teacher top-k || student on those tokens) x T^2."""
    values, indices = (t.to(student_logits.device) for t in teacher)
    values, indices = values[:, :-1].float(), indices[:, :-1].long()
    student = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    picked = student.gather(-1, indices)
    target = F.log_softmax(values / temperature, dim=-1)
    kl = (target.exp() * (target - picked)).sum(-1)
    return (kl * valid).sum() / valid.sum().clamp_min(1) * temperature**2


@register_objective
class CausalLMObjective:
    """Next-token prediction over packed text blocks."""

    name: ClassVar[str] = "causal_lm"

    def outputs(self, model: nn.Module, batch: dict) -> Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, outputs: Tensor, batch: dict) -> Tensor:
        nll, valid = token_nll(outputs, batch)
        return nll.sum() / valid.sum().clamp_min(1)

    def importance_loss(self, model: nn.Module, batch: dict) -> Tensor:
        """Next-token NLL summed over every real token (sums of micro-batches add up)."""
        nll, _ = token_nll(self.outputs(model, batch), batch)
        return nll.sum()

    def kd_loss(self, outputs, teacher, batch, *, temperature: float, alpha: float) -> Tensor:
        _, valid = next_token_targets(batch)
        kl = topk_kl(outputs, teacher, valid, temperature)
        if alpha >= 1.0:
            return kl
        return alpha * kl + (1.0 - alpha) * self.loss(outputs, batch)

    def make_teacher(self, model: nn.Module, split: EncodedSplit, *, batch_size: int = 8):
        """The model's top-k next-token logits for every row of `split` (fp16 values, int32 ids)."""
        n, width = split.input_ids.shape
        values = torch.zeros(n, width, KD_TOP_K, dtype=torch.float16)
        indices = torch.zeros(n, width, KD_TOP_K, dtype=torch.int32)
        for rows, _, logits in _row_logits(model, split, batch_size):
            top = logits.float().topk(KD_TOP_K, dim=-1)
            values[rows, : logits.shape[1]] = top.values.to(torch.float16).cpu()
            indices[rows, : logits.shape[1]] = top.indices.to(torch.int32).cpu()
        return CachedTopK(values, indices)

    def evaluate(self, model: nn.Module, split: EncodedSplit, *, batch_size: int = 8) -> EvalResult:
        """Mean next-token NLL per token, its perplexity and next-token top-1 accuracy."""
        if len(split) == 0:
            raise SplitError("evaluate: split is empty")
        nll_sum, hits, tokens = 0.0, 0, 0
        for _, batch, logits in _row_logits(model, split, batch_size):
            nll, valid = token_nll(logits, batch)
            targets, _ = next_token_targets(batch)
            nll_sum += float(nll.sum())
            hits += int(((logits[:, :-1].argmax(-1) == targets) & valid).sum())
            tokens += int(valid.sum())
        loss = nll_sum / max(tokens, 1)
        return EvalResult(
            accuracy=hits / max(tokens, 1),
            macro_f1=None,
            loss=loss,
            confusion=None,
            n=len(split),
            perplexity=math.exp(min(loss, 700.0)),
            tokens=tokens,
        )


def _row_logits(model: nn.Module, split: EncodedSplit, batch_size: int):
    """(row indices, inputs, logits) per batch on the model's device, in eval mode without grad.

    Logits stay on the device: a batch of 8 x 256 tokens over a 49k vocabulary is 400 MB."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in split.batches(batch_size):
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
                yield batch["index"], inputs, model(**inputs).logits
    finally:
        model.train(was_training)
