"""RIA (relative importance and activation), structured: a peer's criterion as one file.

Paper: Zhang et al. 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for Large
Language Models" (ICLR). A weight matters relative to the other weights of its row AND of its
column, not by magnitude alone: RI_ij = |W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|, scaled by
the input channel's activation, RI_ij * ||X_j||^a with a = 0.5. Structured here as the sum over
a unit's out-projection columns; the activation is the per-token RMS (not the raw norm over N
tokens), which is one constant factor N^(a/2) for every column of a run, so rankings match the
paper's while scores do not grow with the calibration size.

Layer-local (statistic `input_sums`), so it runs in memory, on Ray workers and layer-streamed
with no code anywhere else (tests/test_criterion_ria.py shows all three).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from stages.criteria.base import out_projection_weight, register_criterion

ACTIVATION_POWER = 0.5  # the paper's a


def relative_importance(out_weight: torch.Tensor, x_sq_sum: torch.Tensor, tokens, width: int):
    """[units] scores of an out-projection [out, in] whose input columns come `width` per unit."""
    w = out_weight.detach().double().abs()
    relative = w / w.sum(dim=1, keepdim=True).clamp_min(1e-30)
    relative = relative + w / w.sum(dim=0, keepdim=True).clamp_min(1e-30)
    rms = (x_sq_sum.double().clamp_min(0) / float(tokens)).sqrt()
    per_column = (relative * rms.pow(ACTIVATION_POWER)).sum(dim=0)
    return per_column.reshape(-1, width).sum(dim=1)


@register_criterion
class RelativeImportanceActivation:
    name: ClassVar[str] = "ria"
    granularities: ClassVar[tuple[str, ...]] = ("heads", "channels")
    statistics: ClassVar[tuple[str, ...]] = ("input_sums",)
    layer_local: ClassVar[bool] = True

    def score(self, model, adapter, stats, granularity):
        width = adapter.unit_width(model, granularity)
        return [
            relative_importance(
                out_projection_weight(model, adapter, i, granularity),
                stats[f"{i}.x_sq_sum"],
                stats["tokens"],
                width,
            )
            for i in range(len(adapter.layers(model)))
        ]
