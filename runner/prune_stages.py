"""Prune stages of a ModelRun: budgets, importance requests, plans, guarded cuts.

Kept apart from the run's lifecycle (runner/pipeline.py) so each file reads as one story.
"""

from __future__ import annotations

import copy

from runner.config import PruneStageConfig, RecoverStageConfig, stage_names
from runner.errors import JobError
from runner.models import count_params
from runner.progress import count_bar
from stages.base import PrunePlan, apply_plan
from stages.budget import Budget, stage_budget
from stages.estimate import EstimateRequest, scores_from_statistics
from stages.guards import NumericalError, check_finite
from stages.layers import plan_layer_removal
from stages.units import plan_unit_removal, total_units


class PruneStagesMixin:
    """Methods of ModelRun that run prune stages (needs self.model, adapter, executor, events, cfg)."""

    def _budget(self, idx: int, stage: PruneStageConfig) -> Budget:
        prune_stages = [
            s for s in self.cfg.stages[idx:] if isinstance(s, PruneStageConfig) and s.share
        ]
        return stage_budget(
            ratio=stage.ratio,
            count=stage.count,
            share=stage.share,
            total_units=total_units(self.model, self.adapter, stage.kind),
            params_now=count_params(self.model),
            params_target=self.params_target,
            remaining_shares=sum(s.share for s in prune_stages) or 1.0,
        )

    def _prune(self, idx, stage: PruneStageConfig, name: str, steps: int):
        before = self._snapshot()
        if self._next_recover_needs_pre_stage_teacher(idx):
            self.teacher["pre_stage"] = self._logits(self.splits["train"])
        budget = self._budget(idx, stage)
        plans = []
        for step in range(steps):
            step_budget = _split_budget(budget, steps, step)
            plans.append(self._prune_step(stage, name, step_budget))
        return [p.__dict__ for p in plans], before

    def _dense_scores(self, stage: PruneStageConfig, name: str):
        """Scores from the dense model (version 0), remapped to the surviving layers."""
        request = EstimateRequest(stage.kind, stage.criterion)
        key = (stage.kind, stage.criterion)
        if key not in self.dense_estimates:
            raise JobError(
                f"stage {name}: dense scores were not computed (resume across a one-shot job)"
            )
        scores, stats = self.dense_estimates[key]
        origin = self.layer_origin
        if request.granularity == "layers":
            return scores[origin], stats
        remapped = {k: v for k, v in stats.items() if "." not in k}
        for new, old in enumerate(origin):
            for k, v in stats.items():
                if k.startswith(f"{old}."):
                    remapped[f"{new}." + k.split(".", 1)[1]] = v
        return [scores[o] for o in origin], remapped

    def _estimate_dense_upfront(self) -> None:
        self.dense_estimates = {}
        names = stage_names(self.cfg.stages)
        for idx, stage in enumerate(self.cfg.stages):
            if isinstance(stage, PruneStageConfig) and stage.estimate_on == "dense":
                key = (stage.kind, stage.criterion)
                if key in self.dense_estimates:
                    continue
                request = EstimateRequest(*key)
                self.events.emit(
                    "estimate_start",
                    stage=names[idx],
                    version=self.version,
                    workers=self.executor.workers,
                    criterion=stage.criterion,
                    dense=True,
                )
                stats = self._estimate(request, names[idx])
                scores = scores_from_statistics(self.model, self.adapter, stats, request)
                self.events.emit("estimate_end", stage=names[idx], version=self.version)
                self.dense_estimates[key] = (scores, stats)

    def _estimate(self, request: EstimateRequest, name: str):
        """One calibration pass on every worker, with a bar over batches (or Ray shards)."""
        label = f"{self.model_cfg.ref} {name} {request.criterion}"
        units = self.executor.progress_units()
        with count_bar(units, label, self.cfg.output.progress, "batch") as on_progress:
            return self.executor.estimate(request, self.version, on_progress)

    def _prune_step(self, stage: PruneStageConfig, name: str, budget: Budget) -> PrunePlan:
        request = EstimateRequest(stage.kind, stage.criterion)
        if stage.estimate_on == "dense":
            scores, stats = self._dense_scores(stage, name)
        else:
            self.events.emit(
                "estimate_start",
                stage=name,
                version=self.version,
                workers=self.executor.workers,
                criterion=stage.criterion,
            )
            stats = self._estimate(request, name)
            scores = scores_from_statistics(self.model, self.adapter, stats, request)
            self.events.emit("estimate_end", stage=name, version=self.version)
        plan = self._plan(stage, name, scores, stats, budget)
        guards = self.cfg.guards
        accuracy_before = self._val_accuracy() if guards.max_accuracy_drop is not None else None
        for attempt in range(guards.retries + 1):
            backup = copy.deepcopy(self.model)
            apply_plan(self.model, self.adapter, plan)
            try:
                check_finite(self.model, self.calibration[0])
                self._check_accuracy_drop(accuracy_before)
                break
            except NumericalError as exc:
                self.events.emit("error", stage=name, version=self.version, error=str(exc))
                self.model = backup
                if attempt == guards.retries:
                    raise JobError(f"stage {name}: {exc}; no retries left") from None
                budget = budget.scaled(guards.retry_shrink)
                self.events.emit("retry", stage=name, version=self.version, budget=budget.__dict__)
                plan = self._plan(stage, name, scores, stats, budget)
        if plan.granularity == "layers":
            dropped = set(plan.drop_layers)
            self.layer_origin = [o for i, o in enumerate(self.layer_origin) if i not in dropped]
        self.version += 1
        self.events.emit(
            "prune",
            stage=name,
            version=self.version,
            granularity=stage.kind,
            removed_units=plan.removed_units(),
            params=count_params(self.model),
        )
        self._sync_workers(name)
        return plan

    def _val_accuracy(self) -> float:
        from stages.training import evaluate

        return evaluate(self.model, self.splits["validation"]).accuracy

    def _check_accuracy_drop(self, accuracy_before: float | None) -> None:
        if accuracy_before is None:
            return
        after = self._val_accuracy()
        if accuracy_before - after > self.cfg.guards.max_accuracy_drop:
            raise NumericalError(
                f"validation accuracy collapsed from {accuracy_before:.3f} to {after:.3f} "
                f"(guards.max_accuracy_drop={self.cfg.guards.max_accuracy_drop})"
            )

    def _max_layers_for_target(self, stage: PruneStageConfig) -> int | None:
        """Most layers that can stay if later head/channel stages are to reach the target at all.

        Each kept layer costs at least its min_keep heads and channels; without this bound a
        coarse layer share can leave more layers than the target allows (ratio silently missed).
        """
        if stage.share is None or self.params_target is None:
            return None
        t, model, adapter = self.cfg.target, self.model, self.adapter
        n_layers = len(adapter.layers(model))
        later = {s.kind for s in self.cfg.stages if isinstance(s, PruneStageConfig)} - {"layers"}
        floors = []
        for i in range(n_layers):
            floor = adapter.layer_cost(model, i)
            if "heads" in later:
                floor -= (adapter.attn_units(model, i) - t.min_keep_heads) * adapter.attn_unit_cost(
                    model, i
                )
            if "channels" in later:
                floor -= (
                    adapter.mlp_units(model, i) - t.min_keep_channels
                ) * adapter.mlp_unit_cost(model, i)
            floors.append(floor)
        fixed = count_params(model) - sum(adapter.layer_cost(model, i) for i in range(n_layers))
        room = self.params_target - fixed
        keep = 0
        for floor in sorted(floors):
            if room < floor:
                break
            room -= floor
            keep += 1
        return max(keep, t.min_keep_layers)

    def _plan(self, stage, name, scores, stats, budget) -> PrunePlan:
        common = dict(
            stage=name,
            criterion=stage.criterion,
            version_in=self.version,
            params_before=count_params(self.model),
        )
        t = self.cfg.target
        if stage.kind == "layers":
            return plan_layer_removal(
                self.model,
                self.adapter,
                scores,
                budget,
                min_keep=t.min_keep_layers,
                max_keep=self._max_layers_for_target(stage),
                **common,
            )
        return plan_unit_removal(
            self.model,
            self.adapter,
            stage.kind,
            scores,
            budget,
            min_keep=t.min_keep_heads if stage.kind == "heads" else t.min_keep_channels,
            normalize=stage.normalize,
            uniform=t.uniform_layout,
            stats=stats,
            bias_compensation=stage.bias_compensation,
            **common,
        )

    def _next_recover_needs_pre_stage_teacher(self, idx: int) -> bool:
        for later in self.cfg.stages[idx + 1 :]:
            if isinstance(later, RecoverStageConfig):
                return later.loss == "kd" and later.teacher == "pre_stage"
        return False


def _split_budget(budget: Budget, steps: int, step: int) -> Budget:
    """Split a budget into `steps` near-equal parts (used by SIA's shrink policy)."""
    if steps == 1:
        return budget
    total = budget.units if budget.units is not None else budget.params
    part = total // steps + (1 if step < total % steps else 0)
    return Budget(units=part) if budget.units is not None else Budget(params=part)
