"""A prune stage: budget, importance (on every worker, after the barrier), plan, guarded cut.

Everything here is a function of the run's fixed context and its changing state
(runner/run_state.py); runner/pipeline.py calls `prune` for each layers / heads / channels stage.
"""

from __future__ import annotations

import copy

from runner.config import PruneStageConfig, RecoverStageConfig, stage_names
from runner.errors import JobError
from runner.models import count_params
from runner.progress import count_bar
from runner.recovery import teacher_spec
from runner.run_state import RunContext, RunState
from runner.workers import sync_workers
from stages.base import PrunePlan, apply_plan
from stages.budget import Budget, stage_budget
from stages.estimate import EstimateRequest, scores_from_statistics
from stages.guards import NumericalError, check_finite
from stages.layers import max_layers_for_target, plan_layer_removal
from stages.units import plan_unit_removal, total_units


def prune(
    ctx: RunContext, state: RunState, idx: int, stage: PruneStageConfig, name: str, steps: int
):
    """Run one prune stage in `steps` parts (SIA shrink policy); returns (plans, params before)."""
    before = state.snapshot()
    if _next_recover_needs_pre_stage_teacher(ctx, idx):
        spec = teacher_spec([_next_recover(ctx, idx)])
        state.teachers["pre_stage"] = ctx.task.objective.make_teacher(
            state.model, ctx.data.splits["recovery"], spec
        )
    budget = _budget(ctx, state, idx, stage)
    plans = []
    for step in range(steps):
        plans.append(_prune_step(ctx, state, stage, name, _split_budget(budget, steps, step)))
    return [p.__dict__ for p in plans], before


def estimate_dense_upfront(ctx: RunContext, state: RunState) -> None:
    """Score once on the dense model for every `estimate_on: dense` stage (one-shot baselines)."""
    state.dense_estimates = {}
    names = stage_names(ctx.cfg.stages)
    for idx, stage in enumerate(ctx.cfg.stages):
        if not (isinstance(stage, PruneStageConfig) and stage.estimate_on == "dense"):
            continue
        key = (stage.kind, stage.criterion)
        if key in state.dense_estimates:
            continue
        request = _request(ctx, stage)
        ctx.events.emit(
            "estimate_start", stage=names[idx], version=state.version,
            workers=ctx.executor.workers, criterion=stage.criterion, dense=True,
        )  # fmt: skip
        stats = _estimate(ctx, state, request, names[idx])
        scores = scores_from_statistics(state.model, state.adapter, stats, request)
        ctx.events.emit("estimate_end", stage=names[idx], version=state.version)
        state.dense_estimates[key] = (scores, stats)


def _request(ctx: RunContext, stage: PruneStageConfig) -> EstimateRequest:
    return EstimateRequest(stage.kind, stage.criterion, ctx.objective_name)


def _budget(ctx: RunContext, state: RunState, idx: int, stage: PruneStageConfig) -> Budget:
    prune_stages = [s for s in ctx.cfg.stages[idx:] if isinstance(s, PruneStageConfig) and s.share]
    return stage_budget(
        ratio=stage.ratio,
        count=stage.count,
        share=stage.share,
        total_units=total_units(state.model, state.adapter, stage.kind),
        params_now=count_params(state.model),
        params_target=ctx.params_target,
        remaining_shares=sum(s.share for s in prune_stages) or 1.0,
    )


def _dense_scores(state: RunState, stage: PruneStageConfig, name: str):
    """Scores from the dense model (version 0), remapped to the surviving layers."""
    key = (stage.kind, stage.criterion)
    if key not in state.dense_estimates:
        raise JobError(
            f"stage {name}: dense scores were not computed (resume across a one-shot job)"
        )
    scores, stats = state.dense_estimates[key]
    origin = state.layer_origin
    if stage.kind == "layers":
        return scores[origin], stats
    remapped = {k: v for k, v in stats.items() if "." not in k}
    for new, old in enumerate(origin):
        for k, v in stats.items():
            if k.startswith(f"{old}."):
                remapped[f"{new}." + k.split(".", 1)[1]] = v
    return [scores[o] for o in origin], remapped


def _estimate(ctx: RunContext, state: RunState, request: EstimateRequest, name: str):
    """One calibration pass on every worker, with a bar over batches (or Ray shards)."""
    label = f"{ctx.model_cfg.ref} {name} {request.criterion}"
    units = ctx.executor.progress_units()
    with count_bar(units, label, ctx.cfg.output.progress, "batch", ctx.log) as on_progress:
        return ctx.executor.estimate(request, state.version, on_progress)


def _scores(ctx: RunContext, state: RunState, stage: PruneStageConfig, name: str):
    if stage.estimate_on == "dense":
        return _dense_scores(state, stage, name)
    request = _request(ctx, stage)
    ctx.events.emit(
        "estimate_start", stage=name, version=state.version,
        workers=ctx.executor.workers, criterion=stage.criterion,
    )  # fmt: skip
    stats = _estimate(ctx, state, request, name)
    scores = scores_from_statistics(state.model, state.adapter, stats, request)
    ctx.events.emit("estimate_end", stage=name, version=state.version)
    return scores, stats


def _prune_step(
    ctx: RunContext, state: RunState, stage: PruneStageConfig, name: str, budget: Budget
) -> PrunePlan:
    scores, stats = _scores(ctx, state, stage, name)
    plan = _plan(ctx, state, stage, name, scores, stats, budget)
    guards = ctx.cfg.guards
    accuracy_before = _val_accuracy(ctx, state) if guards.max_accuracy_drop is not None else None
    for attempt in range(guards.retries + 1):
        backup = copy.deepcopy(state.model)
        apply_plan(state.model, state.adapter, plan)
        try:
            check_finite(state.model, ctx.calibration[0])
            _check_accuracy_drop(ctx, state, accuracy_before)
            break
        except NumericalError as exc:
            ctx.events.emit("error", stage=name, version=state.version, error=str(exc))
            state.model = backup
            if attempt == guards.retries:
                raise JobError(f"stage {name}: {exc}; no retries left") from None
            budget = budget.scaled(guards.retry_shrink)
            ctx.events.emit("retry", stage=name, version=state.version, budget=budget.__dict__)
            plan = _plan(ctx, state, stage, name, scores, stats, budget)
    if plan.granularity == "layers":
        dropped = set(plan.drop_layers)
        state.layer_origin = [o for i, o in enumerate(state.layer_origin) if i not in dropped]
    state.version += 1
    ctx.events.emit(
        "prune",
        stage=name,
        version=state.version,
        granularity=stage.kind,
        removed_units=plan.removed_units(),
        params=count_params(state.model),
    )
    sync_workers(ctx, state, name)
    return plan


def _val_accuracy(ctx: RunContext, state: RunState) -> float:
    return ctx.task.evaluate(state.model, ctx.data, "validation").accuracy


def _check_accuracy_drop(ctx: RunContext, state: RunState, accuracy_before: float | None) -> None:
    if accuracy_before is None:
        return
    after = _val_accuracy(ctx, state)
    limit = ctx.cfg.guards.max_accuracy_drop
    if accuracy_before - after > limit:
        raise NumericalError(
            f"validation accuracy collapsed from {accuracy_before:.3f} to {after:.3f} "
            f"(guards.max_accuracy_drop={limit})"
        )


def _max_layers_for_target(ctx: RunContext, state: RunState, stage: PruneStageConfig) -> int | None:
    if stage.share is None or ctx.params_target is None:
        return None
    t = ctx.cfg.target
    later = {s.kind for s in ctx.cfg.stages if isinstance(s, PruneStageConfig)} - {"layers"}
    floors = {
        "layers": t.min_keep_layers,
        "heads": t.min_keep_heads,
        "channels": t.min_keep_channels,
    }
    return max_layers_for_target(state.model, state.adapter, ctx.params_target, later, floors)


def _plan(ctx: RunContext, state: RunState, stage, name, scores, stats, budget) -> PrunePlan:
    common = dict(
        stage=name,
        criterion=stage.criterion,
        version_in=state.version,
        params_before=count_params(state.model),
    )
    t = ctx.cfg.target
    if stage.kind == "layers":
        return plan_layer_removal(
            state.model,
            state.adapter,
            scores,
            budget,
            min_keep=t.min_keep_layers,
            max_keep=_max_layers_for_target(ctx, state, stage),
            **common,
        )
    return plan_unit_removal(
        state.model,
        state.adapter,
        stage.kind,
        scores,
        budget,
        min_keep=t.min_keep_heads if stage.kind == "heads" else t.min_keep_channels,
        normalize=stage.normalize,
        uniform=t.uniform,
        round_to=t.round_to if stage.kind == "channels" else None,
        stats=stats,
        bias_compensation=stage.bias_compensation,
        **common,
    )


def _next_recover(ctx: RunContext, idx: int) -> RecoverStageConfig | None:
    return next((s for s in ctx.cfg.stages[idx + 1 :] if isinstance(s, RecoverStageConfig)), None)


def _next_recover_needs_pre_stage_teacher(ctx: RunContext, idx: int) -> bool:
    later = _next_recover(ctx, idx)
    return later is not None and later.loss == "kd" and later.teacher == "pre_stage"


def _split_budget(budget: Budget, steps: int, step: int) -> Budget:
    """Split a budget into `steps` near-equal parts (used by SIA's shrink policy)."""
    if steps == 1:
        return budget
    total = budget.units if budget.units is not None else budget.params
    part = total // steps + (1 if step < total % steps else 0)
    return Budget(units=part) if budget.units is not None else Budget(params=part)
