"""Head (KV-group) and FFN-channel pruning: turn per-unit scores into a PrunePlan."""

from __future__ import annotations

import torch

from stages.base import PrunePlan
from stages.budget import Budget
from stages.selection import select_by_cost, select_global


def unit_costs(model, adapter, granularity: str) -> list[int]:
    return [adapter.unit_cost(model, i, granularity) for i in range(len(adapter.layers(model)))]


def total_units(model, adapter, granularity: str) -> int:
    n_layers = len(adapter.layers(model))
    if granularity == "layers":
        return n_layers
    return sum(adapter.units(model, i, granularity) for i in range(n_layers))


def plan_unit_removal(
    model,
    adapter,
    granularity: str,
    scores: list[torch.Tensor],
    budget: Budget,
    *,
    stage: str,
    criterion: str,
    version_in: int,
    params_before: int,
    min_keep: int = 1,
    normalize: str = "mean",
    uniform: bool = False,
    round_to: int | None = None,
) -> PrunePlan:
    costs = unit_costs(model, adapter, granularity)
    note = ""
    if budget.params is not None:
        removable = sum(
            (len(sc) - min_keep) * c for sc, c in zip(scores, costs) if len(sc) > min_keep
        )
        if budget.params > removable:
            note = f"budget {budget.params} params capped at the {removable} removable with min_keep={min_keep}"
            budget = Budget(params=removable)
    if budget.units is not None:
        selection = select_global(
            scores, budget.units, min_keep=min_keep, normalize=normalize, uniform=uniform,
            round_to=round_to,
        )  # fmt: skip
    else:
        selection = select_by_cost(
            scores, costs, budget.params, min_keep=min_keep, normalize=normalize,
            uniform=uniform, round_to=round_to,
        )  # fmt: skip
    removed = selection.removed_cost(costs)
    plan = PrunePlan(
        stage=stage,
        granularity=granularity,
        criterion=criterion,
        version_in=version_in,
        params_before=params_before,
        params_to_remove=removed,
        keep={i: list(k) for i, k in enumerate(selection.keep)},
        scores=[[float(v) for v in s] for s in scores],
        note=note,
    )
    return plan
