"""The one planner: a prune stage of a stage list turned into a PrunePlan.

The job (runner/prune.py), the layer-streamed path (`cluster.stream_prune.stream_prune`) and
its in-memory reference (`prune_in_memory`, what the parity tests and benchmarks compare the
stream against) all plan a stage here: budget it (`stage_budget_for`, with the shares still to
come), cap a share-driven layer stage so the later stages can still reach the target
(`max_layers_for_target`), then plan layer or unit removal within `PlanLimits`. One function,
so the paths cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from stages.base import PrunePlan, param_count, stage_names
from stages.budget import Budget, stage_budget
from stages.layers import max_layers_for_target, plan_layer_removal
from stages.prune_stage import is_prune_stage
from stages.units import plan_unit_removal, total_units


@dataclass(frozen=True)
class PlanLimits:
    """What every stage's plan must respect: the parameter target and the layout.

    min_keep: the fewest layers / heads (KV groups) / FFN channels a plan leaves (per layer for
    units); uniform and round_to: the serving layout (docs/DEPLOY.md).
    """

    params_target: int | None = None
    min_keep: dict[str, int] = field(
        default_factory=lambda: {"layers": 1, "heads": 1, "channels": 1}
    )
    uniform: bool = False
    round_to: int | None = None


def stage_budget_for(
    model, adapter, stages: Sequence, idx: int, params_target: int | None
) -> Budget:
    """The budget of prune stage stages[idx] on `model` as cut so far.

    `stages` is the job's whole stage list (recover stages are skipped): a share is taken of the
    gap left, relative to the shares of the prune stages still to run, so the last one closes it.
    """
    stage = stages[idx]
    return stage_budget(
        ratio=stage.ratio,
        count=stage.count,
        share=stage.share,
        total_units=total_units(model, adapter, stage.kind),
        params_now=param_count(model),
        params_target=params_target,
        remaining_shares=sum(s.share for s in stages[idx:] if is_prune_stage(s) and s.share) or 1.0,
    )


def plan_stage(
    model,
    adapter,
    stages: Sequence,
    idx: int,
    scores,
    *,
    limits: PlanLimits,
    version_in: int,
    budget: Budget | None = None,
) -> PrunePlan:
    """The plan of prune stage stages[idx] on `model` (as cut by the stages before it).

    The job and the layer-streamed path both plan with this. `budget` defaults to the stage's
    own (`stage_budget_for`); the job passes parts of it when SIA splits a stage into steps.
    A share-driven layer stage is capped so the later head/channel stages can still reach the
    target. A compensated stage's refit is computed after planning (cluster/compensate_model.py,
    cluster.layer_passes.compensate).
    """
    stage = stages[idx]
    if budget is None:
        budget = stage_budget_for(model, adapter, stages, idx, limits.params_target)
    common = dict(
        stage=stage_names(stages)[idx],
        criterion=stage.criterion,
        version_in=version_in,
        params_before=param_count(model),
    )
    min_keep = limits.min_keep
    if stage.kind == "layers":
        max_keep = None
        if stage.share is not None and limits.params_target is not None:
            kinds = {s.kind for s in stages if is_prune_stage(s)} - {"layers"}
            max_keep = max_layers_for_target(model, adapter, limits.params_target, kinds, min_keep)
        return plan_layer_removal(
            model, adapter, scores, budget, min_keep=min_keep["layers"], max_keep=max_keep, **common
        )
    return plan_unit_removal(
        model,
        adapter,
        stage.kind,
        scores,
        budget,
        min_keep=min_keep[stage.kind],
        normalize=stage.normalize,
        uniform=limits.uniform,
        round_to=limits.round_to if stage.kind == "channels" else None,
        **common,
    )
