"""Taylor: group-level first-order importance (LLM-Pruner), from unit-gate gradients."""

from __future__ import annotations

from typing import ClassVar

from stages import importance as imp
from stages.criteria.base import register_criterion


@register_criterion
class Taylor:
    """|dL/dm_u| with L the task's importance loss summed over the calibration set (see
    `stages.importance.taylor`). Needs a backward pass through the whole model."""

    name: ClassVar[str] = "taylor"
    granularities: ClassVar[tuple[str, ...]] = ("heads", "channels")
    statistics: ClassVar[tuple[str, ...]] = ("mask_grad",)
    layer_local: ClassVar[bool] = False

    def score(self, model, adapter, stats, granularity):
        return [imp.taylor(stats[f"{i}.mask_grad"]) for i in range(len(adapter.layers(model)))]
