"""Block influence (ShortGPT): how much a block changes its hidden states (1 - cosine)."""

from __future__ import annotations

from typing import ClassVar

import torch

from stages import importance as imp
from stages.criteria.base import register_criterion


@register_criterion
class BlockInfluence:
    name: ClassVar[str] = "block_influence"
    granularities: ClassVar[tuple[str, ...]] = ("layers",)
    statistics: ClassVar[tuple[str, ...]] = ("layer_distance",)
    layer_local: ClassVar[bool] = True

    def score(self, model, adapter, stats, granularity):
        tokens = stats["tokens"]
        n_layers = len(adapter.layers(model))
        return torch.tensor(
            [imp.block_influence(stats[f"{i}.dist_sum"], tokens) for i in range(n_layers)]
        )
