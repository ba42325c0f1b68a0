"""Importance criteria, one module each, registered by name.

A criterion says which granularities it scores, which additive statistics it needs
(stages/statistics.py collects them, so Ray workers reduce them exactly) and how it scores from
them. The job config's allowed criterion names come from this registry (`criteria_for`).
Adding a criterion = one new module in this folder (+ its test): every module here is imported
below, the established ones first in the order docs and error messages list them, then any
other module in name order. A `layer_local` criterion streams by construction
(stages/streaming/layer_view.py runs its statistics and score on one layer at a time).
"""

import importlib
import pkgutil

from stages.criteria.base import (
    GRANULARITIES,
    Criterion,
    criteria_for,
    get_criterion,
    register_criterion,
)

_LISTED_FIRST = (
    "block_influence",
    "loss_delta",
    "taylor",
    "wanda",
    "l2",
    "activation",
    "fluctuation",
    "condition",
)


def _import_all() -> None:
    found = {m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"}
    for name in [n for n in _LISTED_FIRST if n in found] + sorted(found - set(_LISTED_FIRST)):
        importlib.import_module(f"{__name__}.{name}")


_import_all()

__all__ = ["GRANULARITIES", "Criterion", "criteria_for", "get_criterion", "register_criterion"]
