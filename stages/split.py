"""A dataset split tokenised once and kept as tensors, and the batches every stage reads from it.

Splits are tokenised once into in-memory tensors, so every stage trains, scores and evaluates on
exactly the same token ids without re-tokenising. A split may carry per-row `targets` (the dense
model's sentence embeddings for the embedding task); the objective reads them from the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


class SplitError(ValueError):
    """A split cannot be built or batched (missing column, empty, no pad token, bad shapes)."""


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
            raise SplitError(
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
        """Yield batches; columns that are padding in every row of a batch are trimmed
        (`kept_columns`: caches of per-position outputs find a batch's columns with it)."""
        if batch_size < 1:
            raise SplitError(f"EncodedSplit.batches: batch_size must be >= 1, got {batch_size}")
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            mask = self.attention_mask[rows]
            lo, hi = kept_columns(mask)
            batch = {
                "input_ids": self.input_ids[rows, lo:hi],
                "attention_mask": mask[:, lo:hi],
                "labels": self.labels[rows],
                "index": rows,  # row positions in this split (cached teacher logits use them)
            }
            if self.targets is not None:
                batch["targets"] = self.targets[rows]
            yield batch


def kept_columns(mask: Tensor) -> tuple[int, int]:
    """[lo, hi): the columns of a batch's attention mask that are not padding in every row."""
    used = mask.any(dim=0).nonzero()
    return (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, mask.shape[1])


def encode_split(dataset: Any, tokenizer: Any, max_length: int = 96) -> EncodedSplit:
    """Tokenise a split with "text"/"label" columns, padding to its longest text."""
    for column in ("text", "label"):
        if column not in dataset.column_names:
            raise SplitError(f"encode_split: dataset has no {column!r} column")
    if len(dataset) == 0:
        raise SplitError("encode_split: dataset split is empty")
    if tokenizer.pad_token_id is None:
        raise SplitError("encode_split: tokenizer has no pad token (set tokenizer.pad_token)")
    enc = tokenizer(
        list(dataset["text"]),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    labels = torch.as_tensor(list(dataset["label"]), dtype=torch.long)
    return EncodedSplit(enc["input_ids"].long(), enc["attention_mask"].long(), labels)
