"""Importance criteria, one module each, registered by name.

A criterion says which granularities it scores, which additive statistics it needs
(stages/statistics.py collects them, so Ray workers reduce them exactly) and how it scores from
them. The job config's allowed criterion names come from this registry (`criteria_for`), in the
order the modules are imported below (the order docs and error messages list them).
Adding a criterion = one new module here (+ its test) imported below.
"""

# isort: skip_file
from stages.criteria.base import (
    GRANULARITIES,
    Criterion,
    criteria_for,
    get_criterion,
    register_criterion,
)
from stages.criteria import block_influence, loss_delta  # noqa: F401  (layers)
from stages.criteria import taylor, wanda, l2, activation, fluctuation, condition  # noqa: F401

__all__ = ["GRANULARITIES", "Criterion", "criteria_for", "get_criterion", "register_criterion"]
