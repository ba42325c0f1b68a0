"""Loss delta: how much the task's importance loss rises when a block is skipped (per row)."""

from __future__ import annotations

from typing import ClassVar

import torch

from stages.criteria.base import register_criterion


@register_criterion
class LossDelta:
    name: ClassVar[str] = "loss_delta"
    granularities: ClassVar[tuple[str, ...]] = ("layers",)
    statistics: ClassVar[tuple[str, ...]] = ("skip_loss",)
    layer_local: ClassVar[bool] = False

    def score(self, model, adapter, stats, granularity):
        base = stats["loss_sum"]
        n_layers = len(adapter.layers(model))
        return torch.stack(
            [(stats[f"{i}.skip_loss_sum"] - base) / stats["rows"] for i in range(n_layers)]
        )
