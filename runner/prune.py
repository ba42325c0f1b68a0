"""A prune stage: budget, importance (on every worker, after the barrier), plan, guarded cut.

Everything here is a function of the run's fixed context and its changing state
(runner/run_state.py); runner/pipeline.py calls `prune` for each layers / heads / channels stage.
"""

from __future__ import annotations

import copy

from cluster.compensate_model import compensate_model
from runner.config import RecoverStageConfig, stage_names
from runner.errors import JobError
from runner.progress import count_bar
from runner.recovery import teacher_spec
from runner.run_state import RunContext, RunState
from runner.workers import sync_workers
from stages.base import PrunePlan, apply_plan, param_count
from stages.budget import Budget
from stages.estimate import EstimateRequest, scores_from_statistics
from stages.guards import NumericalError, check_finite
from stages.prune_stage import PruneStage
from stages.stage_plan import plan_stage, stage_budget_for


def prune(ctx: RunContext, state: RunState, idx: int, stage: PruneStage, name: str, steps: int):
    """Run one prune stage in `steps` parts (SIA shrink policy); returns (plans, params before)."""
    before = state.snapshot()
    if next_recover_needs_pre_stage_teacher(ctx.cfg.stages, idx):
        spec = teacher_spec([next_recover(ctx.cfg.stages, idx)])
        state.teachers["pre_stage"] = ctx.task.objective.make_teacher(
            state.model, ctx.data.splits["recovery"], spec
        )
    budget = stage_budget_for(
        state.model, state.adapter, ctx.cfg.stages, idx, ctx.limits.params_target
    )
    plans = []
    for step in range(steps):
        part = _split_budget(budget, steps, step)
        plans.append(_prune_step(ctx, state, idx, stage, name, part))
    return plans, before


def estimate_dense_upfront(ctx: RunContext, state: RunState) -> None:
    """Score once on the dense model for every `estimate_on: dense` stage (one-shot baselines)."""
    state.dense_estimates = {}
    names = stage_names(ctx.cfg.stages)
    for idx, stage in enumerate(ctx.cfg.stages):
        if not (isinstance(stage, PruneStage) and stage.estimate_on == "dense"):
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
        state.dense_estimates[key] = scores


def _request(ctx: RunContext, stage: PruneStage) -> EstimateRequest:
    return EstimateRequest(stage.kind, stage.criterion, ctx.objective_name)


def _dense_scores(state: RunState, stage: PruneStage, name: str):
    """Scores from the dense model (version 0), remapped to the surviving layers."""
    key = (stage.kind, stage.criterion)
    if key not in state.dense_estimates:
        raise JobError(
            f"stage {name}: dense scores were not computed (resume across a one-shot job)"
        )
    scores = state.dense_estimates[key]
    origin = state.layer_origin
    if stage.kind == "layers":
        return scores[origin]
    return [scores[o] for o in origin]


def _estimate(ctx: RunContext, state: RunState, request: EstimateRequest, name: str):
    """One calibration pass on every worker, with a bar over batches (or Ray shards)."""
    label = f"{ctx.model_cfg.ref} {name} {request.criterion}"
    units = ctx.executor.progress_units()
    with count_bar(units, label, ctx.cfg.output.progress, "batch", ctx.log) as on_progress:
        return ctx.executor.estimate(request, state.version, on_progress)


def _scores(ctx: RunContext, state: RunState, stage: PruneStage, name: str):
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
    return scores


def _prune_step(
    ctx: RunContext, state: RunState, idx: int, stage: PruneStage, name: str, budget: Budget
) -> PrunePlan:
    scores = _scores(ctx, state, stage, name)
    plan = _plan(ctx, state, idx, scores, budget)
    guards = ctx.cfg.guards
    accuracy_before = _val_accuracy(ctx, state) if guards.max_accuracy_drop is not None else None
    for attempt in range(guards.retries + 1):
        backup = copy.deepcopy(state.model)
        compensate_model(
            state.model, state.adapter, plan, stage, ctx.calibration, work_dir=ctx.out, log=ctx.log
        )
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
            plan = _plan(ctx, state, idx, scores, budget)
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
        params=param_count(state.model),
        **_compensation_event(plan),
    )
    sync_workers(ctx, state, name)
    return plan


def _compensation_event(plan: PrunePlan) -> dict:
    """The prune event's compensation fields: method and mean relative output error."""
    layers = plan.compensation.get("layers")
    if not layers:
        return {}
    mean = {
        k: sum(e[k] for e in layers.values()) / len(layers) for k in next(iter(layers.values()))
    }
    return {
        "compensation": plan.compensation["method"],
        **{k: round(v, 6) for k, v in mean.items()},
    }


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


def _plan(ctx: RunContext, state: RunState, idx: int, scores, budget) -> PrunePlan:
    return plan_stage(
        state.model, state.adapter, ctx.cfg.stages, idx, scores,
        limits=ctx.limits, version_in=state.version, budget=budget,
    )  # fmt: skip


def next_recover(stages: list, idx: int) -> RecoverStageConfig | None:
    """The first recover stage after stage `idx`, if any."""
    return next((s for s in stages[idx + 1 :] if isinstance(s, RecoverStageConfig)), None)


def next_recover_needs_pre_stage_teacher(stages: list, idx: int) -> bool:
    """Does the first recover stage after prune stage `idx` distil from the model before it?"""
    later = next_recover(stages, idx)
    return later is not None and later.loss == "kd" and later.teacher == "pre_stage"


def _split_budget(budget: Budget, steps: int, step: int) -> Budget:
    """Split a budget into `steps` near-equal parts (used by SIA's shrink policy)."""
    if steps == 1:
        return budget
    total = budget.units if budget.units is not None else budget.params
    part = total // steps + (1 if step < total % steps else 0)
    return Budget(units=part) if budget.units is not None else Budget(params=part)
