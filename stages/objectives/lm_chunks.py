"""The causal-LM training loss with the LM head and the loss computed a chunk of tokens at a time.

A plain forward materialises logits for every position: 8 x 128 tokens x 49,152 vocabulary in
fp32 is 200 MB, and the loss's softmax, its gradient and the KD terms add as many again. Here the
backbone's hidden states of the VALID positions only (a position predicting padding, or the last
of a block, gets no logits) go through the head `chunk` tokens at a time under activation
checkpointing: a chunk's logits exist only while its loss and, in the backward pass, its
gradient are computed (the head's forward runs twice, ~+7% of a SmolLM2 LoRA step's FLOPs).
Same value and gradients as the plain loss up to float rounding (tests/test_recovery_speed.py).

Only for model families whose adapter says the causal-LM forward is exactly
`head(backbone(x))` (`plain_lm_head`: no logit scaling or soft-capping); others, and DDP /
DeepSpeed-wrapped models (their gradient sync needs their own forward), get None and the caller
falls back to the plain loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from stages.arch import find_adapter
from stages.objectives.lm_teacher import TopKRows, kl_per_position, teacher_tail


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not isinstance(base, PreTrainedModel):
        return None
    adapter = find_adapter(getattr(base.config, "model_type", None))
    if adapter is None or not adapter.plain_lm_head:
        return None
    head = base.get_output_embeddings()
    backbone = base.base_model
    return (backbone, head) if head is not None and backbone is not base else None


def chunked_lm_loss(
    model: nn.Module,
    batch: dict,
    targets: Tensor,
    valid: Tensor,
    *,
    chunk: int,
    teacher: TopKRows | None = None,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> Tensor | None:
    """Mean next-token loss over the valid positions ([B, T-1] `targets` where `valid`): CE, or
    with a teacher alpha x KL x T^2 + (1 - alpha) x CE; None for a model of another family."""
    parts = _backbone_and_head(model)
    if parts is None:
        return None
    backbone, head = parts
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden, targets = hidden[:, :-1][valid], targets[valid]
    kd = None
    if teacher is not None:
        tail = teacher_tail(teacher, temperature)
        device = hidden.device
        kd = tuple(
            t[:, :-1].to(device)[valid.to(device)] for t in (teacher.values, teacher.indices, tail)
        )

    def chunk_loss(h: Tensor, y: Tensor, *rows: Tensor) -> Tensor:
        logits = head(h).float()
        ce = F.cross_entropy(logits, y, reduction="sum")
        if not rows:
            return ce
        kl = kl_per_position(logits, *rows, temperature).sum() * temperature**2
        return alpha * kl + (1.0 - alpha) * ce if alpha < 1.0 else kl

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        cut = slice(start, start + chunk)
        rows = tuple(t[cut] for t in kd) if kd is not None else ()
        total = total + checkpoint(
            chunk_loss, hidden[cut], targets[cut], *rows, use_reentrant=False
        )
    return total / max(hidden.shape[0], 1)
