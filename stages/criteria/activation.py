"""Activation: RMS over tokens of a unit's activation norm (Minitron-style)."""

from __future__ import annotations

from typing import ClassVar

from stages import importance as imp
from stages.criteria.base import register_criterion


@register_criterion
class Activation:
    name: ClassVar[str] = "activation"
    granularities: ClassVar[tuple[str, ...]] = ("heads", "channels")
    statistics: ClassVar[tuple[str, ...]] = ("input_sums",)
    layer_local: ClassVar[bool] = True

    def score(self, model, adapter, stats, granularity):
        width = adapter.unit_width(model, granularity)
        return [
            imp.activation_norm(stats[f"{i}.x_sq_sum"], stats["tokens"], width)
            for i in range(len(adapter.layers(model)))
        ]
