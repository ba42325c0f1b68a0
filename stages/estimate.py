"""Importance estimation: collect a criterion's statistics (shardable sums), then score.

The two halves are apart on purpose: workers (cluster/) run `collect_for` on their shard of the
calibration micro-batches, the driver reduces the sums in a fixed order and calls
`scores_from_statistics` once, so 1 worker, N workers and the in-process path give the same scores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from stages.criteria import get_criterion
from stages.objectives import get_objective
from stages.statistics import Stats, collect_statistics, reduce_statistics

__all__ = [
    "EstimateRequest",
    "Stats",
    "collect_for",
    "estimate_locally",
    "reduce_statistics",
    "scores_from_statistics",
]


@dataclass(frozen=True)
class EstimateRequest:
    """What to score: a granularity (layers | heads | channels), a criterion, and the objective
    (by name, so a Ray worker rebuilds it) whose loss gradient-based criteria differentiate."""

    granularity: str
    criterion: str
    objective: str = "classification"


def collect_for(
    model: nn.Module, adapter, batches: Iterable[dict], request: EstimateRequest
) -> Stats:
    """This shard's additive statistics for `request` (what a worker returns)."""
    criterion = get_criterion(request.criterion)
    objective = get_objective(request.objective)
    return collect_statistics(
        model, adapter, batches, criterion.statistics, request.granularity, objective
    )


def scores_from_statistics(model: nn.Module, adapter, stats: Stats, request: EstimateRequest):
    """Per-layer scores: a [layers] tensor for layer pruning, else a list of float64 [units]."""
    scores = get_criterion(request.criterion).score(model, adapter, stats, request.granularity)
    if request.granularity == "layers":
        return scores
    return [s.detach().to(torch.float64).cpu() for s in scores]


def estimate_locally(model: nn.Module, adapter, batches, request: EstimateRequest):
    """Single-process path: collect, (trivially) reduce, score -> (scores, stats)."""
    stats = reduce_statistics([collect_for(model, adapter, batches, request)])
    return scores_from_statistics(model, adapter, stats, request), stats
