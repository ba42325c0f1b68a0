"""Layer-removal planning: budgets, min_keep, and the reachability bound max_keep."""

import pytest
import torch
from tiny_models import tiny_gpt2

from stages.arch import get_adapter
from stages.budget import Budget
from stages.layers import plan_layer_removal

COMMON = dict(stage="layers", criterion="block_influence", version_in=0, params_before=0)


@pytest.fixture
def model():
    return tiny_gpt2()


def test_removes_lowest_scores_by_count(model):
    n = len(get_adapter(model).layers(model))
    scores = torch.arange(n, 0, -1, dtype=torch.float64)  # last layer least important
    plan = plan_layer_removal(model, get_adapter(model), scores, Budget(units=1), **COMMON)
    assert plan.drop_layers == [n - 1]


def test_ties_go_to_the_lower_index_and_min_keep_holds():
    """Block influence (higher = more important): the lowest go, ties to the lower index."""
    model = tiny_gpt2(n_layer=5)
    adapter = get_adapter(model)
    scores = torch.tensor([0.9, 0.1, 0.3, 0.1, 0.8], dtype=torch.float64)

    def drop(n: int, **kw) -> list[int]:
        plan = plan_layer_removal(model, adapter, scores, Budget(units=n), **COMMON, **kw)
        return plan.drop_layers

    assert drop(2) == [1, 3] and drop(3) == [1, 2, 3] and drop(0) == []
    with pytest.raises(ValueError, match="at least 2 must stay"):
        drop(4, min_keep=2)


def test_param_budget_takes_the_closest_number_of_layers(model):
    adapter = get_adapter(model)
    cost = adapter.layer_cost(model, 0)
    scores = torch.zeros(len(adapter.layers(model)), dtype=torch.float64)
    assert (
        len(
            plan_layer_removal(
                model, adapter, scores, Budget(params=int(cost * 1.4)), **COMMON
            ).drop_layers
        )
        == 1
    )
    assert (
        len(
            plan_layer_removal(
                model, adapter, scores, Budget(params=int(cost * 1.6)), **COMMON
            ).drop_layers
        )
        == 2
    )


def test_max_keep_drops_more_layers_and_says_so(model):
    adapter = get_adapter(model)
    n = len(adapter.layers(model))
    scores = torch.tensor([3.0, 1.0, 2.0][:n], dtype=torch.float64)
    plan = plan_layer_removal(model, adapter, scores, Budget(units=0), max_keep=1, **COMMON)
    assert plan.drop_layers == sorted([1, 2][: n - 1]) and "reachable" in plan.note


def test_count_beyond_min_keep_is_refused(model):
    adapter = get_adapter(model)
    n = len(adapter.layers(model))
    with pytest.raises(ValueError, match="must stay"):
        plan_layer_removal(model, adapter, torch.zeros(n), Budget(units=n), **COMMON)
