"""Selection rules on hand-made scores: counts, floors, normalisation, uniform, ties, budgets."""

from __future__ import annotations

import pytest
import torch

from stages.selection import Selection, SelectionError, select_by_cost, select_global


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_select_global_removes_lowest_across_layers():
    scores = [t(5, 1, 4), t(0.5, 3, 2, 6)]
    sel = select_global(scores, 3, normalize="none")
    assert sel.remove == [[1], [0, 2]]
    assert sel.keep == [[0, 2], [1, 3]]
    assert sum(map(len, sel.remove)) == 3


def test_select_global_respects_min_keep():
    scores = [t(0.1, 0.2, 0.3), t(5, 6, 7)]
    sel = select_global(scores, 3, normalize="none", min_keep=1)
    assert sel.remove == [[0, 1], [0]]  # layer 0 is floored at one unit
    sel2 = select_global(scores, 2, normalize="none", min_keep=2)
    assert sel2.remove == [[0], [0]]
    with pytest.raises(SelectionError, match="cannot remove 5 units.*at most 4"):
        select_global(scores, 5, normalize="none", min_keep=1)


def test_normalization_makes_layers_comparable():
    # layer 1 lives on a 100x scale: raw scores would strip layer 0 only
    scores = [t(1, 2, 3, 6), t(100, 300, 200, 400)]
    assert select_global(scores, 2, normalize="none").remove == [[0, 1], []]
    # means 3 and 250 -> [0.33, 0.67, 1, 2] and [0.4, 1.2, 0.8, 1.6]
    assert select_global(scores, 2, normalize="mean").remove == [[0], [0]]
    # maxima 6 and 400 -> [0.17, 0.33, 0.5, 1] and [0.25, 0.75, 0.5, 1]
    assert select_global(scores, 3, normalize="max").remove == [[0, 1], [0]]
    with pytest.raises(SelectionError, match="non-negative"):
        select_global([t(-1, 2)], 1, normalize="mean")


def test_uniform_splits_evenly_and_rounds_down():
    scores = [t(1, 2, 3), t(0.1, 0.2, 0.3), t(9, 8, 7)]
    sel = select_global(scores, 4, uniform=True)  # keep 2 each: 3 removed, keep 1: 6 > 4
    assert sel.remove == [[0], [0], [2]]
    assert sum(map(len, sel.remove)) == 3
    # one kept count for all layers, whatever their sizes: 4 + 2 units, keep 1 each
    assert select_global([t(1, 2, 3, 4), t(2, 1)], 4, uniform=True).keep == [[3], [0]]
    with pytest.raises(SelectionError, match="uniform layout impossible"):
        select_global([t(1, 2, 3, 4), t(2, 1)], 4, uniform=True, min_keep=3)


def test_ties_are_broken_by_layer_then_index():
    scores = [t(1, 1, 1), t(1, 1)]
    assert select_global(scores, 2, normalize="none").remove == [[0, 1], []]
    assert select_global(scores, 3, normalize="none").remove == [[0, 1], [0]]  # (0, 2) floored
    assert select_global(scores, 2, uniform=True).remove == [[0], []]  # both keep 2
    again = select_global(scores, 3, normalize="none")
    assert again == select_global(scores, 3, normalize="none")


def test_select_global_matches_naive_greedy_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randint(0, 5, (n,), generator=gen).float() for n in (4, 7, 3, 5)]
    for n_remove in range(0, 12):
        got = select_global(scores, n_remove, normalize="none", min_keep=2)
        ranked = sorted(
            (float(s[i]), layer, i) for layer, s in enumerate(scores) for i in range(len(s))
        )
        removed: list[list[int]] = [[] for _ in scores]
        for _, layer, i in ranked:
            if sum(map(len, removed)) == n_remove:
                break
            if len(scores[layer]) - len(removed[layer]) > 2:
                removed[layer].append(i)
        assert got.remove == [sorted(r) for r in removed]


def test_select_by_cost_stops_at_budget():
    scores = [t(1, 5, 2), t(3, 0.5)]
    costs = [10, 100]
    # greedy order: (1,1)=0.5 ->100, (0,0)=1 ->110, (0,2)=2 ->120, (1,0)=3, ...
    assert select_by_cost(scores, costs, 100, normalize="none").remove == [[], [1]]
    assert select_by_cost(scores, costs, 101, normalize="none").remove == [[0], [1]]
    sel = select_by_cost(scores, costs, 115, normalize="none")
    assert sel.remove == [[0, 2], [1]] and sel.removed_cost(costs) == 120
    assert select_by_cost(scores, costs, 0, normalize="none").remove == [[], []]
    # min_keep=0: the fourth unit (1,0) overshoots the budget by 99, less than its cost 100
    assert select_by_cost(scores, costs, 121, normalize="none", min_keep=0).remove == [
        [0, 2],
        [0, 1],
    ]
    with pytest.raises(SelectionError, match="at most 120 are removable"):
        select_by_cost(scores, costs, 121, normalize="none", min_keep=1)


def test_select_by_cost_uniform_uses_smallest_equal_count():
    scores = [t(4, 1, 3, 2), t(2, 8, 1, 5)]
    sel = select_by_cost(scores, [10, 30], 41, uniform=True)  # 1 unit/layer = 40 < 41 -> 2 each
    assert sel.remove == [[1, 3], [0, 2]]
    assert sel.removed_cost([10, 30]) == 80
    most = select_by_cost(scores, [10, 30], 121, uniform=True)  # unreachable: keep 1 each
    assert [len(k) for k in most.keep] == [1, 1] and most.removed_cost([10, 30]) == 120
    with pytest.raises(SelectionError, match="unit_costs has 1 entries"):
        select_by_cost(scores, [10], 5)


def test_selection_is_frozen():
    sel = Selection(keep=[[0]], remove=[[1]])
    with pytest.raises(AttributeError):
        sel.keep = [[1]]  # type: ignore[misc]


def test_round_to_keeps_multiples_and_still_reaches_the_budget():
    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(40, generator=gen) for _ in range(3)]
    costs = [3, 3, 3]
    for budget in (0, 30, 100, 200):
        sel = select_by_cost(scores, costs, budget, round_to=8)
        assert all(len(k) % 8 == 0 for k in sel.keep), budget
        assert budget <= sel.removed_cost(costs) < budget + 3 * 8 * 3
    plain = select_by_cost(scores, costs, 100)
    rounded = select_by_cost(scores, costs, 100, round_to=8)
    # the chunks given up are each layer's lowest-ranked units
    for s, kept in zip(scores, rounded.keep):
        dropped = sorted(set(range(40)) - set(kept))
        assert max(float(s[i]) for i in dropped) <= min(float(s[i]) for i in kept)
    assert plain.removed_cost(costs) <= rounded.removed_cost(costs)


def test_uniform_with_round_to_keeps_one_multiple_everywhere():
    scores = [torch.arange(40.0), torch.arange(40.0).flip(0), torch.ones(40)]
    sel = select_by_cost(scores, [1, 1, 1], 50, uniform=True, round_to=16)
    assert [len(k) for k in sel.keep] == [16, 16, 16]  # 32 each removes 24 < 50
    assert sel.keep[0] == list(range(24, 40)) and sel.keep[1] == list(range(16))
