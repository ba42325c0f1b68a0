"""Fluctuation (FLAP): input variance over tokens x squared column norm of the out-projection.

Its `x_sum` statistic also feeds FLAP's bias compensation (stages/units.py).
"""

from __future__ import annotations

from typing import ClassVar

from stages import importance as imp
from stages.criteria.base import out_projection_weight, register_criterion


@register_criterion
class Fluctuation:
    name: ClassVar[str] = "fluctuation"
    granularities: ClassVar[tuple[str, ...]] = ("heads", "channels")
    statistics: ClassVar[tuple[str, ...]] = ("input_sums",)
    layer_local: ClassVar[bool] = True

    def score(self, model, adapter, stats, granularity):
        width = adapter.unit_width(model, granularity)
        return [
            imp.fluctuation(
                out_projection_weight(model, adapter, i, granularity),
                stats[f"{i}.x_sum"],
                stats[f"{i}.x_sq_sum"],
                stats["tokens"],
                width,
            )
            for i in range(len(adapter.layers(model)))
        ]
