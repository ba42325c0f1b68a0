"""Condition (COMP-like): OBS least-squares cost of removing a unit's columns given the others."""

from __future__ import annotations

from typing import ClassVar

from stages import importance as imp
from stages.criteria.base import out_projection_weight, register_criterion


@register_criterion
class Condition:
    name: ClassVar[str] = "condition"
    granularities: ClassVar[tuple[str, ...]] = ("heads", "channels")
    statistics: ClassVar[tuple[str, ...]] = ("input_gram",)
    layer_local: ClassVar[bool] = True

    def score(self, model, adapter, stats, granularity):
        width = adapter.unit_width(model, granularity)
        return [
            imp.condition_scores(
                out_projection_weight(model, adapter, i, granularity), stats[f"{i}.gram"], width
            )
            for i in range(len(adapter.layers(model)))
        ]
