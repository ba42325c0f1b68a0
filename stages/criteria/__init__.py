"""Importance criteria, one module each, registered by name.

A criterion says which granularities it scores, which additive statistics it needs
(stages/statistics.py collects them, so Ray workers reduce them exactly) and how it scores from
them. The job config's allowed criterion names come from this registry (`criteria_for`).
Adding a criterion = one new module here (+ its test) imported below.
"""

# Built-in criteria register themselves on import (order = the order the docs list them).
from stages.criteria import (  # noqa: E402,F401,I001
    activation,
    block_influence,
    condition,
    fluctuation,
    l2,
    loss_delta,
    taylor,
    wanda,
)
from stages.criteria.base import (
    GRANULARITIES,
    Criterion,
    criteria_for,
    get_criterion,
    register_criterion,
)

__all__ = ["GRANULARITIES", "Criterion", "criteria_for", "get_criterion", "register_criterion"]
