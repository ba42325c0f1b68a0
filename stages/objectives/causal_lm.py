"""Causal language modelling: next-token cross-entropy, and KL to a teacher's cached distribution.

Batches are packed text blocks (right-padded only when a block is the last, partial one): the
token at position t predicts token t + 1 wherever both are real tokens.

The KD teacher is held as its TOP-K next-token logits per position plus, for every temperature it
will be read at, the log-sum-exp of its other tokens (the TAIL), cached once: k = 32 costs
32 x (4 B value + 4 B index) + 4 B per temperature = 260 B per token, against 4 B x vocabulary
for the full distribution (196 KB per token for SmolLM2's 49,152 tokens: 1,000 blocks of 256
tokens would be 50 GB). The loss is the exact KL between the teacher and the student coarsened to
k + 1 outcomes: the k teacher tokens, and one bucket holding the rest of the vocabulary (the
teacher's tail mass against the student's mass outside those k tokens). It is zero, with a zero
gradient, when the student is the teacher, at every temperature and every k.

Why the tail bucket: renormalising the teacher over its top k instead (what this module did
first) asks the student to move ALL its mass into those k tokens. For SmolLM2 on its own
documentation the top 32 tokens hold 81% of the mass at T = 1 but only 17.6% at T = 2, so the
teacher distilled into itself had a KD loss of 7.67 and a gradient pushing it away from itself;
recovery by that loss lost to plain CE at every ratio (docs/RESULTS.md, "Distillation").

Running the teacher on the fly instead would hold a second model copy (4 B x parameters: 540 MB
for 135M in fp32) and cost one teacher forward per step; the cache costs one pass over the
training blocks, once per stage.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.metrics import EvalResult
from stages.objectives.base import TeacherSpec, model_device, register_objective
from stages.split import EncodedSplit, SplitError, kept_columns


class TeacherError(ValueError):
    """A cached teacher does not fit the batch or the loss asked of it."""


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


class TopKRows(NamedTuple):
    """A batch's teacher: top-k logits [B, W, k], their token ids, tail log-sum-exp [B, W] per T."""

    values: Tensor
    indices: Tensor
    tails: dict[float, Tensor]


class CachedTopK:
    """A teacher's top-k next-token logits and tails per training row and position.

    A batch's columns are found by the rule that trimmed them (`kept_columns` of the rows' padding
    masks). It keeps the token ids it was computed on and refuses a batch whose ids differ at the
    rows and columns looked up (a shuffled, sharded, subset or left-trimmed batch that does not
    line up fails loudly instead of distilling the wrong positions). Picklable: Ray Train workers
    receive it with their split.
    """

    def __init__(self, values: Tensor, indices: Tensor, tails: dict[float, Tensor], split):
        self.values, self.indices, self.tails = values, indices, tails
        self.input_ids, self.attention_mask = split.input_ids, split.attention_mask.bool()

    def __call__(self, batch: dict) -> TopKRows:
        rows, width = batch["index"].cpu(), batch["input_ids"].shape[1]
        known = rows.numel() and int(rows.max()) < len(self)
        start = kept_columns(self.attention_mask[rows])[0] if known else 0
        columns = slice(start, start + width)
        if rows.numel() and (
            not known
            or start + width > self.input_ids.shape[1]
            or not torch.equal(self.input_ids[rows, columns], batch["input_ids"].cpu())
        ):
            raise TeacherError(
                f"kd: the cached teacher ({len(self)} rows x {self.input_ids.shape[1]} tokens) "
                f"was not computed on this batch's tokens (rows {rows.tolist()[:8]}, columns "
                f"{start}..{start + width}): the teacher must be made on the split training reads"
            )
        tails = {t: tail[rows, columns] for t, tail in self.tails.items()}
        return TopKRows(self.values[rows, columns], self.indices[rows, columns], tails)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def nbytes(self) -> int:
        tails = sum(t.nbytes for t in self.tails.values())
        ids = self.input_ids.nbytes + self.attention_mask.nbytes
        return self.values.nbytes + self.indices.nbytes + tails + ids


def _log_softmax_parts(scaled: Tensor, indices: Tensor) -> tuple[Tensor, Tensor | None]:
    """(log p of the `indices` tokens, log p of all other tokens together or None when there are
    none) of the distribution softmax(scaled), in float32."""
    total = torch.logsumexp(scaled, dim=-1, keepdim=True)
    top = scaled.gather(-1, indices) - total
    if indices.shape[-1] >= scaled.shape[-1]:
        return top, None
    rest = torch.logsumexp(scaled.scatter(-1, indices, float("-inf")), dim=-1) - total.squeeze(-1)
    return top, rest


def topk_kl(student_logits: Tensor, teacher: TopKRows, valid: Tensor, temperature: float) -> Tensor:
    """Mean over valid positions of KL(teacher || student) x T^2 over the teacher's top k tokens
    and one bucket for the rest of the vocabulary (module docstring)."""
    tail = teacher.tails.get(float(temperature))
    if tail is None:
        raise TeacherError(
            f"kd: the teacher was cached for temperatures {sorted(teacher.tails)}, not "
            f"{temperature}; make it with TeacherSpec(temperatures=...) including it"
        )
    device = student_logits.device
    values = teacher.values[:, :-1].to(device).float() / temperature
    indices = teacher.indices[:, :-1].to(device).long()
    tail = tail[:, :-1].to(device).float()
    teacher_total = torch.logaddexp(torch.logsumexp(values, dim=-1), tail)
    teacher_top = values - teacher_total.unsqueeze(-1)
    student_top, student_rest = _log_softmax_parts(
        student_logits[:, :-1].float() / temperature, indices
    )
    kl = (teacher_top.exp() * (teacher_top - student_top)).sum(-1)
    if student_rest is not None:
        teacher_rest = tail - teacher_total
        mass = teacher_rest.exp()
        kl = kl + torch.where(mass > 0, mass * (teacher_rest - student_rest), 0.0)
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

    def make_teacher(
        self,
        model: nn.Module,
        split: EncodedSplit,
        spec: TeacherSpec | None = None,
        *,
        batch_size: int = 8,
    ) -> CachedTopK:
        """The model's top-k next-token logits (fp32, int32 ids) and tail log-sum-exp per
        temperature for every row of `split` (module docstring)."""
        spec = spec or TeacherSpec()
        n, width = split.input_ids.shape
        cache: dict = {}
        for rows, offset, _, logits in _row_logits(model, split, batch_size):
            z = logits.float()
            k = z.shape[-1] if spec.top_k is None else min(spec.top_k, z.shape[-1])
            if not cache:
                cache = {
                    "values": torch.zeros(n, width, k),
                    "indices": torch.zeros(n, width, k, dtype=torch.int32),
                    "tails": {float(t): torch.zeros(n, width) for t in spec.temperatures},
                }
            top = z.topk(k, dim=-1)
            columns = slice(offset, offset + z.shape[1])
            cache["values"][rows, columns] = top.values.cpu()
            cache["indices"][rows, columns] = top.indices.to(torch.int32).cpu()
            rest = z.scatter(-1, top.indices, float("-inf")) if k < z.shape[-1] else None
            for t, tail in cache["tails"].items():
                tail[rows, columns] = (
                    torch.logsumexp(rest / t, dim=-1).cpu() if rest is not None else float("-inf")
                )
        if not cache:
            raise SplitError("make_teacher: split is empty")
        return CachedTopK(cache["values"], cache["indices"], cache["tails"], split)

    def evaluate(self, model: nn.Module, split: EncodedSplit, *, batch_size: int = 8) -> EvalResult:
        """Mean next-token NLL per token, its perplexity and next-token top-1 accuracy."""
        if len(split) == 0:
            raise SplitError("evaluate: split is empty")
        nll_sum, hits, tokens = 0.0, 0, 0
        for _, _, batch, logits in _row_logits(model, split, batch_size):
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
    """(row indices, first column, inputs, logits) per batch on the model's device, in eval mode
    without grad.

    Logits stay on the device: a batch of 8 x 256 tokens over a 49k vocabulary is 400 MB."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in split.batches(batch_size):
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
                start = kept_columns(split.attention_mask[batch["index"]])[0]
                yield batch["index"], start, inputs, model(**inputs).logits
    finally:
        model.train(was_training)
