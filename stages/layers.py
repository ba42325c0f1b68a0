"""Layer pruning: drop whole transformer blocks with the lowest importance (ShortGPT-style)."""

from __future__ import annotations

import torch

from stages.base import PrunePlan, param_count
from stages.budget import Budget


def plan_layer_removal(
    model,
    adapter,
    scores: torch.Tensor,
    budget: Budget,
    *,
    stage: str,
    criterion: str,
    version_in: int,
    params_before: int,
    min_keep: int = 1,
    max_keep: int | None = None,
) -> PrunePlan:
    """Remove the lowest-scoring layers (higher score = more important) up to the budget.

    max_keep: drop further lowest-scoring layers until at most this many remain (a param budget
    that later stages could not otherwise reach).
    """
    n_layers = len(scores)
    order = sorted(range(n_layers), key=lambda i: (float(scores[i]), i))
    removable = max(0, n_layers - min_keep)
    drop: list[int] = []
    if budget.units is not None:
        if budget.units > removable:
            raise ValueError(
                f"stage {stage}: asked to remove {budget.units} of {n_layers} layers but at least "
                f"{min_keep} must stay"
            )
        drop = order[: budget.units]
    else:
        removed = 0
        for idx in order:
            if len(drop) >= removable:
                break
            cost = adapter.layer_cost(model, idx)
            # take the layer if that brings the removed total closer to the budget
            if removed + cost / 2 > budget.params:
                break
            drop.append(idx)
            removed += cost
    note = ""
    if max_keep is not None and n_layers - len(drop) > max_keep:
        extra = [i for i in order if i not in drop][: n_layers - len(drop) - max_keep]
        drop += extra
        note = f"dropped {len(extra)} more layer(s) so that the parameter target stays reachable"
    removed_params = sum(adapter.layer_cost(model, i) for i in drop)
    return PrunePlan(
        stage=stage,
        granularity="layers",
        criterion=criterion,
        version_in=version_in,
        params_before=params_before,
        params_to_remove=removed_params,
        drop_layers=sorted(drop),
        scores=[float(s) for s in scores],
        note=note,
    )


def max_layers_for_target(
    model, adapter, params_target: int, later: set[str], min_keep: dict[str, int]
) -> int:
    """Most layers that can stay if the later head/channel stages (`later`) are to reach
    `params_target` at all.

    Each kept layer costs at least its min_keep heads and channels (min_keep = {"layers": ...,
    "heads": ..., "channels": ...}); without this bound a coarse layer stage can leave more layers
    than the target allows, and the ratio is silently missed.
    """
    n_layers = len(adapter.layers(model))
    floors = []
    for i in range(n_layers):
        floor = adapter.layer_cost(model, i)
        if "heads" in later:
            spare = adapter.attn_units(model, i) - min_keep["heads"]
            floor -= spare * adapter.attn_unit_cost(model, i)
        if "channels" in later:
            spare = adapter.mlp_units(model, i) - min_keep["channels"]
            floor -= spare * adapter.mlp_unit_cost(model, i)
        floors.append(floor)
    params = param_count(model)
    room = params_target - (params - sum(adapter.layer_cost(model, i) for i in range(n_layers)))
    keep = 0
    for floor in sorted(floors):
        if room < floor:
            break
        room -= floor
        keep += 1
    return max(keep, min_keep["layers"])
