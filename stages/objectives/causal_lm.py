"""Causal language modelling: next-token cross-entropy, and KL to a teacher's cached distribution.

Batches are packed text blocks (right-padded only when a block is the last, partial one): the
token at position t predicts token t + 1 wherever both are real tokens. The teacher and the KL
are in lm_teacher.py; the loss with the LM head run a chunk of tokens at a time in lm_chunks.py.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.metrics import EvalResult
from stages.objectives.base import TeacherSpec, model_device, register_objective
from stages.objectives.lm_chunks import chunked_lm_loss
from stages.objectives.lm_teacher import CachedTopK, topk_kl
from stages.split import EncodedSplit, SplitError, kept_columns


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

    def chunked_loss(
        self,
        model: nn.Module,
        batch: dict,
        teacher,
        *,
        chunk: int,
        temperature: float,
        alpha: float,
    ) -> Tensor | None:
        """The training loss (`loss`, or `kd_loss` with a teacher) with the LM head and the loss
        run `chunk` valid tokens at a time (lm_chunks.py); None where the model cannot."""
        targets, valid = next_token_targets(batch)
        return chunked_lm_loss(
            model, batch, targets, valid, chunk=chunk, teacher=teacher,
            temperature=temperature, alpha=alpha,
        )  # fmt: skip

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
