"""Zero-shot multiple choice, scored the way lm-evaluation-harness scores it (pure torch).

For every item and choice the model reads context + choice tokens once; the choice's
log-likelihood is the sum of log p(token | everything before it) over the CHOICE tokens only.
acc takes the argmax of those sums; acc_norm divides each by the choice's length first, which
removes the bias towards short answers that raw sums have. lm-evaluation-harness divides by
`len(choice)` of the choice string without the leading space (characters); the caller passes that
number as `ChoiceItem.choice_lengths`, so a byte-length variant is one argument away.

Tokenisation is the caller's (runner.data.choice_tasks does it as lm-eval does: the continuation is
" " + choice, encoded as tokens(context + continuation) minus tokens(context)). Like lm-eval, an
input longer than `max_length` keeps its LAST max_length + 1 tokens (the context is cut from the
left) and the final token is never fed, only predicted.

Sequences are batched with padding. Position ids are passed explicitly (the count of real tokens
before each position), so right and left padding give the same log-likelihoods; models whose
forward takes no position_ids are fed right-padded batches, which causal attention makes exact.
Left padding is the default because it lines every row's choice up at the end, so a model that
takes `logits_to_keep` (transformers causal LMs) computes logits for the choice positions only:
a batch of 16 x 150 tokens over a 49k vocabulary would otherwise hold 470 MB of logits.
Works for any *ForCausalLM-like module whose output has `.logits`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ChoiceItem:
    """One question: context token ids, each choice's token ids (the continuation, leading space
    included), the index of the right choice, and each choice's length for acc_norm."""

    context: Sequence[int]
    choices: Sequence[Sequence[int]]
    label: int
    choice_lengths: Sequence[int]

    def __post_init__(self):
        if len(self.choices) < 2 or len(self.choice_lengths) != len(self.choices):
            raise ValueError(
                f"ChoiceItem: need >= 2 choices and one length per choice, got "
                f"{len(self.choices)} choices and {len(self.choice_lengths)} lengths"
            )
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"ChoiceItem: label {self.label} not in 0..{len(self.choices) - 1}")
        if any(len(c) == 0 for c in self.choices) or any(n <= 0 for n in self.choice_lengths):
            raise ValueError("ChoiceItem: every choice needs >= 1 token and a length > 0")


def _model_max_length(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _forward_params(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _request(context: Sequence[int], choice: Sequence[int], max_length: int) -> tuple[list, int]:
    """(input ids, number of choice tokens) with lm-eval's left truncation."""
    if len(choice) > max_length:
        raise ValueError(f"a choice of {len(choice)} tokens exceeds max_length {max_length}")
    whole = (list(context) + list(choice))[-(max_length + 1) :]
    return whole, len(choice)


def _picked(logits: torch.Tensor, targets: Sequence[int]) -> float:
    """Sum of log_softmax(logits[k])[targets[k]], in float32 softmax and a float64 sum."""
    scores = F.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(targets), device=scores.device)[:, None]
    return float(scores.gather(-1, index).double().sum())


def _cache_argument(params: set[str]) -> str | None:
    """The forward argument taking a KV cache: `cache` (transformers >= 5.2x) or the older name."""
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _shared_context(model, item: ChoiceItem, params: set[str], device) -> list[float] | None:
    """Every choice of one item from ONE pass over the context: its KV cache is repeated for the
    choices, which then run as a right-padded batch. Bearing QA (a ~170-token note, ten choices of
    ~8 tokens) costs ~250 token positions instead of ~1,700. None when the model returns no
    repeatable cache (the caller then uses the plain path)."""
    context, choices = list(item.context), [list(c) for c in item.choices]
    argument = _cache_argument(params)
    kwargs = {"input_ids": torch.tensor([context], device=device), "use_cache": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    cache = out.get("cache") if "cache" in out else out.get("past_key_values")
    if argument is None or cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    first = out.logits[0, -1]  # predicts the first token of every choice
    rest = max(len(c) for c in choices) - 1
    if rest == 0:
        return [_picked(first[None], c) for c in choices]
    cache.batch_repeat_interleave(len(choices))
    batch = torch.zeros(len(choices), rest, dtype=torch.long)
    mask = torch.zeros(len(choices), len(context) + rest, dtype=torch.long)
    mask[:, : len(context)] = 1
    for row, choice in enumerate(choices):
        batch[row, : len(choice) - 1] = torch.tensor(choice[:-1])
        mask[row, len(context) : len(context) + len(choice) - 1] = 1
    kwargs = {"input_ids": batch.to(device), "attention_mask": mask.to(device), argument: cache}
    if "position_ids" in params:
        kwargs["position_ids"] = (
            (len(context) + torch.arange(rest)).expand(len(choices), -1).to(device)
        )
    logits = model(**kwargs).logits
    return [
        _picked(torch.cat([first[None], logits[row, : len(c) - 1]]), c)
        for row, c in enumerate(choices)
    ]


def _batched(model, requests, out, *, batch_size, padding_side, params, pad_id, device) -> None:
    """lm-eval's way: every (context + choice) its own padded row, longest first."""
    positions = "position_ids" in params
    requests = sorted(requests, key=lambda r: (-len(r[2]), r[0], r[1]))
    for start in range(0, len(requests), batch_size):
        group = requests[start : start + batch_size]
        inputs = [ids[:-1] for _, _, ids, _ in group]  # the last token is predicted, not fed
        width = max(len(x) for x in inputs)
        batch = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        offsets = []
        for row, x in enumerate(inputs):
            offset = width - len(x) if padding_side == "left" else 0
            batch[row, offset : offset + len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, offset : offset + len(x)] = 1
            offsets.append(offset)
        kwargs = {"input_ids": batch.to(device), "attention_mask": mask.to(device)}
        if positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        # Only the choice positions are scored: ask for the last `keep` logits, not all
        # width x vocab of them (left padding makes `keep` the longest choice).
        keep = width - min(o + len(x) - r[3] for o, x, r in zip(offsets, inputs, group))
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = keep
        logits = model(**kwargs).logits
        shift = width - logits.shape[1]  # 0 when the model returned every position
        for row, (i, j, ids, n_choice) in enumerate(group):
            end = offsets[row] + len(inputs[row]) - shift  # logits[end - 1] predicts ids[-1]
            out[i][j] = _picked(logits[row, end - n_choice : end], ids[-n_choice:])


@torch.no_grad()
def choice_logliks(
    model,
    items: Sequence[ChoiceItem],
    *,
    batch_size: int = 16,
    padding_side: str = "left",
    max_length: int | None = None,
    pad_id: int = 0,
    share_context: bool = True,
) -> list[list[float]]:
    """Summed log-likelihood of every choice of every item (float64 sums of float32 log-softmax).

    share_context: score an item's choices from one pass over its context (KV cache), when the
    model returns a cache and nothing needs truncating; the same numbers (to float rounding) for
    a fraction of the compute. Otherwise requests are batched lm-eval style, longest first. The
    result is in item order. Raises ValueError on an item with no context token at all.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    limit = max_length or _model_max_length(model) or 2048
    params = _forward_params(model)
    if "position_ids" not in params:
        padding_side = "right"
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out: list[list[float]] = [[0.0] * len(item.choices) for item in items]
    requests = []
    was_training = model.training
    model.eval()
    try:
        for i, item in enumerate(items):
            if not item.context:
                raise ValueError(
                    f"item {i}: empty context; give at least a BOS/EOS token as lm-eval"
                )
            fits = len(item.context) + max(len(c) for c in item.choices) - 1 <= limit
            if share_context and fits and _cache_argument(params):
                shared = _shared_context(model, item, params, device)
                if shared is not None:
                    out[i] = shared
                    continue
            for j, choice in enumerate(item.choices):
                ids, n_choice = _request(item.context, choice, limit)
                requests.append((i, j, ids, n_choice))
        _batched(
            model, requests, out, batch_size=batch_size, padding_side=padding_side,
            params=params, pad_id=pad_id, device=device,
        )  # fmt: skip
    finally:
        model.train(was_training)
    return out


def score(items: Sequence[ChoiceItem], logliks: Sequence[Sequence[float]]) -> dict:
    """{"acc", "acc_norm", "n"}: argmax (first maximum on ties, as numpy) of raw and of
    length-normalised log-likelihoods against the labels."""
    if not items:
        return {"acc": float("nan"), "acc_norm": float("nan"), "n": 0}
    hits = hits_norm = 0
    for item, values in zip(items, logliks):
        raw = torch.tensor(values, dtype=torch.float64)
        norm = raw / torch.tensor(list(item.choice_lengths), dtype=torch.float64)
        hits += int(torch.argmax(raw)) == item.label
        hits_norm += int(torch.argmax(norm)) == item.label
    n = len(items)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "n": n}


def evaluate_choice_tasks(
    model, tasks: Mapping[str, Sequence[ChoiceItem]], **kwargs
) -> dict[str, dict]:
    """{task name: {"acc", "acc_norm", "n"}} for every task (kwargs go to choice_logliks)."""
    return {
        name: score(items, choice_logliks(model, items, **kwargs)) for name, items in tasks.items()
    }
