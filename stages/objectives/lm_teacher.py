"""The cached KD teacher of a causal LM, and the KL a student is trained by against it.

The KD teacher is held as its TOP-K next-token logits per position plus, for every temperature it
will be read at, the log-sum-exp of its other tokens (the TAIL), cached once: k = 32 costs
32 x (4 B value + 4 B index) + 4 B per temperature = 260 B per token, against 4 B x vocabulary
for the full distribution (196 KB per token for SmolLM2's 49,152 tokens: 1,000 blocks of 256
tokens would be 50 GB). The loss is the exact KL between the teacher and the student coarsened to
k + 1 outcomes: the k teacher tokens, and one bucket holding the rest of the vocabulary (the
teacher's tail mass against the student's mass outside those k tokens). It is zero, with a zero
gradient, when the student is the teacher, at every temperature and every k.

Why the tail bucket: renormalising the teacher over its top k instead (what causal_lm.py did
first) asks the student to move ALL its mass into those k tokens. For SmolLM2 on 128 tokens of
this project's README the top 32 tokens hold 81% of the mass at T = 1 but only 17% at T = 2, so
the teacher distilled into itself had a KD loss of 7.67 and a gradient pushing it away from
itself; recovery by that loss lost to plain CE at every ratio (docs/RESULTS.md, "Distillation").

Running the teacher on the fly instead would hold a second model copy (4 B x parameters: 540 MB
for 135M in fp32) and cost one teacher forward per step; the cache costs one pass over the
training blocks, once per stage.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from stages.split import kept_columns


class TeacherError(ValueError):
    """A cached teacher does not fit the batch or the loss asked of it."""


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


def teacher_log_probs(values: Tensor, tail: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log p of the top-k tokens [..., k], log p of the tail bucket [...]) at `temperature`."""
    scaled = values.float() / temperature
    total = torch.logaddexp(torch.logsumexp(scaled, dim=-1), tail.float())
    return scaled - total.unsqueeze(-1), tail.float() - total


def kl_per_position(
    student_logits: Tensor, values: Tensor, indices: Tensor, tail: Tensor, temperature: float
) -> Tensor:
    """KL(teacher || student) per position [...] over the teacher's top k tokens and one bucket
    for the rest of the vocabulary, in float32 (module docstring); not yet x T^2."""
    teacher_top, teacher_rest = teacher_log_probs(values, tail, temperature)
    student_top, student_rest = _log_softmax_parts(
        student_logits.float() / temperature, indices.long()
    )
    kl = (teacher_top.exp() * (teacher_top - student_top)).sum(-1)
    if student_rest is None:
        return kl
    mass = teacher_rest.exp()
    return kl + torch.where(mass > 0, mass * (teacher_rest - student_rest), 0.0)


def teacher_tail(teacher: TopKRows, temperature: float) -> Tensor:
    tail = teacher.tails.get(float(temperature))
    if tail is None:
        raise TeacherError(
            f"kd: the teacher was cached for temperatures {sorted(teacher.tails)}, not "
            f"{temperature}; make it with TeacherSpec(temperatures=...) including it"
        )
    return tail


def topk_kl(student_logits: Tensor, teacher: TopKRows, valid: Tensor, temperature: float) -> Tensor:
    """Mean over valid positions of KL(teacher || student) x T^2 (`kl_per_position`)."""
    device = student_logits.device
    values, indices, tail = (
        t[:, :-1].to(device)
        for t in (teacher.values, teacher.indices, teacher_tail(teacher, temperature))
    )
    kl = kl_per_position(student_logits[:, :-1], values, indices, tail, temperature)
    return (kl * valid).sum() / valid.sum().clamp_min(1) * temperature**2
