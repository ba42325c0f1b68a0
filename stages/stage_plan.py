"""One prune stage of a stage list turned into a plan, the way the job plans it.

The layer-streamed path (`stages.streaming.stream_prune`) and its in-memory reference
(`prune_in_memory`, what the parity tests and benchmarks compare the stream against) both walk a
list of stages without recovery: budget the stage (`stage_budget`, with the shares still to come),
cap a share-driven layer stage so the later stages can still reach the target
(`max_layers_for_target`), then plan layer or unit removal. `plan_stage` is that walk's one step,
so the two paths cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

from stages.base import PrunePlan, apply_plan, stage_names
from stages.budget import stage_budget
from stages.estimate import EstimateRequest, estimate_locally
from stages.layers import max_layers_for_target, plan_layer_removal
from stages.units import plan_unit_removal, total_units


def param_count(model) -> int:
    """Parameters of `model` (a meta-device skeleton counts the same as real weights)."""
    return sum(p.numel() for p in model.parameters())


def plan_stage(
    model,
    adapter,
    stages: Sequence,
    idx: int,
    scores,
    *,
    params_target: int | None,
    min_keep: dict[str, int],
    uniform: bool = False,
    round_to: int | None = None,
    stats=None,
    bias_compensation: bool = False,
) -> PrunePlan:
    """The plan of stages[idx] on `model` (as cut by the stages before it; version_in = idx).

    `stages` are StreamStage-like (kind, criterion, ratio, count, share, normalize). `stats` and
    `bias_compensation` give the plan FLAP bias deltas computed in memory; the streamed path
    computes them layer by layer instead and passes neither.
    """
    stage = stages[idx]
    params = param_count(model)
    budget = stage_budget(
        ratio=stage.ratio,
        count=stage.count,
        share=stage.share,
        total_units=total_units(model, adapter, stage.kind),
        params_now=params,
        params_target=params_target,
        remaining_shares=sum(s.share for s in stages[idx:] if s.share) or 1.0,
    )
    common = dict(
        stage=stage_names(stages)[idx],
        criterion=stage.criterion,
        version_in=idx,
        params_before=params,
    )
    if stage.kind == "layers":
        max_keep = None
        if stage.share is not None and params_target is not None:
            later = {s.kind for s in stages} - {"layers"}
            max_keep = max_layers_for_target(model, adapter, params_target, later, min_keep)
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
        uniform=uniform,
        round_to=round_to if stage.kind == "channels" else None,
        stats=stats,
        bias_compensation=bias_compensation,
        **common,
    )


def prune_in_memory(
    model,
    adapter,
    stages: Sequence,
    batches: Sequence[dict],
    params_target: int | None,
    *,
    min_keep: int = 1,
) -> list[PrunePlan]:
    """The stages without recovery on a model held in memory: estimate, plan, apply, in place.

    The reference the streamed path must match plan for plan (tests, benchmarks/streaming.py).
    """
    floors = {"layers": min_keep, "heads": min_keep, "channels": min_keep}
    plans = []
    for idx, stage in enumerate(stages):
        request = EstimateRequest(stage.kind, stage.criterion)
        scores, stats = estimate_locally(model, adapter, batches, request)
        plan = plan_stage(
            model,
            adapter,
            stages,
            idx,
            scores,
            params_target=params_target,
            min_keep=floors,
            stats=stats,
            bias_compensation=stage.bias_compensation,
        )
        apply_plan(model, adapter, plan)
        plans.append(plan)
    return plans
