"""How much a prune stage removes: a unit count, or a parameter budget."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    units: int | None = None
    params: int | None = None

    def __post_init__(self) -> None:
        if (self.units is None) == (self.params is None):
            raise ValueError("a Budget is either units or params")

    def scaled(self, factor: float) -> Budget:
        """A smaller step of the same budget (for shrink/retry policies)."""
        if self.units is not None:
            return Budget(units=max(1, math.floor(self.units * factor)))
        return Budget(params=max(1, math.floor(self.params * factor)))


def stage_budget(
    *,
    ratio: float | None,
    count: int | None,
    share: float | None,
    total_units: int,
    params_now: int,
    params_target: int | None,
    remaining_shares: float,
) -> Budget:
    """Turn a stage's amount (ratio / count / share of the remaining parameter gap) into a Budget.

    share is relative among the share-driven stages still to run, so the last one closes the gap
    left by the earlier ones' rounding and the overall target is met.
    """
    if ratio is not None:
        return Budget(units=math.floor(ratio * total_units))
    if count is not None:
        return Budget(units=count)
    if params_target is None:
        raise ValueError("share needs a parameter target (target.ratio, device or budget_bytes)")
    gap = max(0, params_now - params_target)
    return Budget(params=round(gap * share / remaining_shares))
