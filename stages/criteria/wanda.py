"""Wanda: |weight| x input RMS, summed over a unit's out-projection columns."""

from __future__ import annotations

from typing import ClassVar

from stages import importance as imp
from stages.criteria.base import out_projection_weight, register_criterion


@register_criterion
class Wanda:
    name: ClassVar[str] = "wanda"
    granularities: ClassVar[tuple[str, ...]] = ("heads", "channels")
    statistics: ClassVar[tuple[str, ...]] = ("input_sums",)
    layer_local: ClassVar[bool] = True

    def score(self, model, adapter, stats, granularity):
        width = adapter.unit_width(model, granularity)
        return [
            imp.wanda(
                out_projection_weight(model, adapter, i, granularity),
                stats[f"{i}.x_sq_sum"],
                stats["tokens"],
                width,
            )
            for i in range(len(adapter.layers(model)))
        ]
