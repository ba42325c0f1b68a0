"""The one prune-stage type: a job file's layers / heads / channels stage, and a streamed one.

Why one type: the job (runner/config.py puts it in its stage list), the layer-streamed path
(cluster/stream_prune.py) and the planner (stages/stage_plan.py) read the same fields, so a field or
a rule added here reaches all of them and is validated once. `streaming_problems` is the one
statement of what the layer-streamed path cannot do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from stages.compensation import CompensationSettings
from stages.criteria import criteria_for, get_criterion

PRUNE_KINDS = ("layers", "heads", "channels")


class PruneStage(BaseModel):
    """One pruning granularity. Amount: exactly one of ratio / count / share."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    kind: Literal["layers", "heads", "channels"]
    name: str | None = None
    criterion: str = "wanda"
    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="fraction of units to remove")
    count: int | None = Field(None, ge=1, description="number of units to remove")
    share: float | None = Field(
        None, gt=0.0, le=1.0, description="share of the remaining parameter budget of target.ratio"
    )
    normalize: Literal["none", "mean", "max"] = "mean"
    compensate: Literal["none", "bias", "lsq"] = Field(
        "none",
        description="refit the output projection of every layer that lost units, in closed form "
        "on the calibration data: lsq = least squares on its kept inputs (+ intercept where it "
        "has a bias), bias = the intercept only (FLAP); stages/compensation.py. A job leaves "
        "it to its task when unset: lsq for causal LMs, none otherwise",
    )
    compensate_inputs: Literal["sequential", "parallel"] = Field(
        "parallel",
        description="sequential: fit on the inputs of the model cut so far (layers below already "
        "compensated), parallel: on the uncut model's own inputs (FLAP)",
    )
    compensate_ridge: float = Field(
        1e-2, gt=0.0, le=1e3, description="ridge towards the current weights, x mean input power"
    )
    estimate_on: Literal["current", "dense"] = Field(
        "current", description="dense: score on the unpruned model once (one-shot baselines)"
    )

    @model_validator(mode="before")
    @classmethod
    def _bias_compensation_alias(cls, value: Any) -> Any:
        """`bias_compensation: true` (before `compensate` existed) is FLAP's: bias, parallel."""
        if isinstance(value, dict) and "bias_compensation" in value:
            value = dict(value)
            if value.pop("bias_compensation"):
                value.setdefault("compensate", "bias")
                value.setdefault("compensate_inputs", "parallel")
        return value

    @property
    def compensation(self) -> CompensationSettings:
        return CompensationSettings(self.compensate, self.compensate_inputs, self.compensate_ridge)

    @model_validator(mode="after")
    def _check(self) -> PruneStage:
        allowed = criteria_for(self.kind)
        if self.criterion not in allowed:
            raise ValueError(
                f"criterion {self.criterion!r} is not valid for {self.kind}; "
                f"choose from {', '.join(allowed)}"
            )
        given = [k for k in ("ratio", "count", "share") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of ratio, count, share (got {given or 'none'})")
        if self.kind == "layers" and self.compensate != "none":
            raise ValueError(
                "compensate refits the projection that consumed removed heads or channels; a "
                "layers stage removes whole blocks: use compensate: none"
            )
        return self


def is_prune_stage(stage: Any) -> bool:
    return getattr(stage, "kind", None) in PRUNE_KINDS


def layer_local_criteria(kind: str) -> tuple[str, ...]:
    """Criteria computed from one layer's own inputs: the ones the streamed path can score."""
    return tuple(n for n in criteria_for(kind) if get_criterion(n).layer_local)


def streaming_problems(stages: Sequence[Any], names: Sequence[str]) -> list[tuple[int, str]]:
    """(stage index, problem) for each thing the layer-streamed path cannot do with `stages`.

    It never holds the whole model: prune stages run first, one streamed pass each, before any
    recovery, scored by layer-local criteria on the model as it is.
    """
    problems = []
    kinds = [s.kind for s in stages]
    first_recover = kinds.index("recover") if "recover" in kinds else len(kinds)
    for i, s in enumerate(stages):
        if not is_prune_stage(s):
            continue
        if i > first_recover:
            problems.append(
                (i, f"stages.{i} ({names[i]}): calibration.streamed runs every prune stage before "
                    "any recovery; move the recover stages after the last prune stage")
            )  # fmt: skip
        if not get_criterion(s.criterion).layer_local:
            problems.append(
                (i, f"stages.{i}.criterion: {s.criterion} needs the whole model at once (a "
                    "forward, for taylor a backward pass through it), which calibration.streamed "
                    f"never holds; use {', '.join(layer_local_criteria(s.kind))}")
            )  # fmt: skip
        if s.estimate_on == "dense":
            problems.append(
                (i, f"stages.{i}.estimate_on: dense scoring is not streamed; use current")
            )
    return problems
