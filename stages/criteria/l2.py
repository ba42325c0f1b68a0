"""L2: the norm of every weight a unit owns (data-free)."""

from __future__ import annotations

from typing import ClassVar

from stages import importance as imp
from stages.criteria.base import register_criterion


@register_criterion
class L2:
    name: ClassVar[str] = "l2"
    granularities: ClassVar[tuple[str, ...]] = ("heads", "channels")
    statistics: ClassVar[tuple[str, ...]] = ()
    layer_local: ClassVar[bool] = True

    def score(self, model, adapter, stats, granularity):
        unit_weights = (
            adapter.attn_unit_weights if granularity == "heads" else adapter.mlp_unit_weights
        )
        return [imp.l2_magnitude(unit_weights(model, i)) for i in range(len(adapter.layers(model)))]
