"""Turning importance scores into what to keep: pure, deterministic selection rules.

Why: every structured stage (heads, KV groups, FFN channels, whole layers) ends with the same
question, "which units go?", under a count or a parameter budget, with a floor per layer.
Keeping that logic here, apart from the models, makes it testable on hand-made scores.

Determinism: scores are compared in float64 and ties are broken by (layer, index), lowest first,
so the same scores always give the same selection on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Normalize = Literal["none", "mean", "max"]


class SelectionError(ValueError):
    """A selection request that cannot be met (budget, floors, bad scores); says which numbers."""


@dataclass(frozen=True)
class Selection:
    """Per-layer kept and removed unit indices, each list sorted ascending."""

    keep: list[list[int]]
    remove: list[list[int]]

    def removed_cost(self, unit_costs: Sequence[int]) -> int:
        """Parameters removed when layer l's units each cost unit_costs[l]."""
        return sum(len(r) * int(c) for r, c in zip(self.remove, unit_costs, strict=True))


def _prepared(scores: Sequence[Tensor], normalize: Normalize, min_keep: int) -> list[Tensor]:
    """Validate per-layer scores and return float64 copies, divided by the layer mean/max."""
    if normalize not in ("none", "mean", "max"):
        raise SelectionError(f"normalize must be 'none', 'mean' or 'max', got {normalize!r}")
    if min_keep < 0:
        raise SelectionError(f"min_keep must be >= 0, got {min_keep}")
    if len(scores) == 0:
        raise SelectionError("no layers: scores is an empty sequence")
    out = []
    for layer, s in enumerate(scores):
        s = torch.as_tensor(s).detach().to("cpu", torch.float64)
        if s.dim() != 1:
            raise SelectionError(f"layer {layer}: scores must be 1-D, got shape {tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise SelectionError(f"layer {layer}: scores contain NaN or inf")
        if normalize != "none" and s.numel():
            if (s < 0).any():
                raise SelectionError(
                    f"layer {layer}: normalize={normalize!r} needs non-negative scores, "
                    f"min is {float(s.min()):.4g}"
                )
            denom = s.mean() if normalize == "mean" else s.max()
            s = s / denom if denom > 0 else s  # an all-zero layer stays all zero
        out.append(s)
    return out


def _capacities(sizes: list[int], min_keep: int) -> list[int]:
    return [max(0, n - min_keep) for n in sizes]


def _global_order(prepared: list[Tensor], capacity: list[int]) -> tuple[Tensor, Tensor]:
    """(layer, index) of every removable unit in greedy order: lowest score first, ties by
    (layer, index), skipping units beyond a layer's capacity (equivalent to the greedy loop)."""
    flat = torch.cat(prepared)
    layer = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(prepared)])
    index = torch.cat([torch.arange(len(s)) for s in prepared])
    order = torch.argsort(flat, stable=True)  # concatenation is in (layer, index) order
    layer_sorted = layer[order]
    # rank of each unit within its own layer, counted in the global order
    by_layer = torch.argsort(layer_sorted, stable=True)
    starts = torch.cumsum(torch.tensor([0] + [len(s) for s in prepared[:-1]]), 0)
    within = torch.empty_like(by_layer)
    within[by_layer] = torch.arange(len(by_layer)) - starts[layer_sorted[by_layer]]
    eligible = within < torch.tensor(capacity)[layer_sorted]
    return layer_sorted[eligible], index[order][eligible]


def _build(sizes: list[int], removed: list[list[int]]) -> Selection:
    remove = [sorted(r) for r in removed]
    keep = [sorted(set(range(n)) - set(r)) for n, r in zip(sizes, remove)]
    return Selection(keep=keep, remove=remove)


def _lowest(s: Tensor, k: int) -> list[int]:
    """Indices of the k lowest scores of one layer, ties by index."""
    return torch.argsort(s, stable=True)[:k].tolist()


def _from_order(sizes: list[int], layers: Tensor, indices: Tensor, n: int) -> Selection:
    removed: list[list[int]] = [[] for _ in sizes]
    for layer, index in zip(layers[:n].tolist(), indices[:n].tolist()):
        removed[layer].append(index)
    return _build(sizes, removed)


def select_global(
    scores: Sequence[Tensor],
    n_remove: int,
    *,
    min_keep: int = 1,
    normalize: Normalize = "mean",
    uniform: bool = False,
    round_to: int | None = None,
) -> Selection:
    """Remove the n_remove lowest-scoring units across all layers.

    scores[l] is a 1-D tensor of layer l's unit scores (higher = more important; layers may have
    different unit counts). normalize divides each layer by its mean or max first so layers are
    comparable (needs scores >= 0). No layer keeps fewer than min_keep units (SelectionError if
    n_remove makes that impossible). uniform=True keeps the SAME count K in every layer, the
    largest K that removes at most n_remove units in all (rounded DOWN), each layer by its own
    ranking. round_to: kept counts are multiples of it (see select_by_cost). Ties are broken by
    (layer, index), lowest first.
    """
    prepared = _prepared(scores, normalize, min_keep)
    if n_remove < 0:
        raise SelectionError(f"n_remove must be >= 0, got {n_remove}")
    sizes = [len(s) for s in prepared]
    capacity = _capacities(sizes, min_keep)
    if uniform:
        return _uniform(prepared, [1] * len(sizes), n_remove, min_keep, round_to, at_most=True)
    if n_remove > sum(capacity):
        raise SelectionError(
            f"cannot remove {n_remove} units: {sum(sizes)} units in {len(sizes)} layers with "
            f"min_keep={min_keep} allow at most {sum(capacity)}"
        )
    layers, indices = _global_order(prepared, capacity)
    selection = _from_order(sizes, layers, indices, n_remove)
    return _rounded(prepared, selection, [1] * len(sizes), n_remove, min_keep, round_to)


def _allowed_counts(size: int, min_keep: int, round_to: int | None) -> list[int]:
    """Kept counts a layer of `size` units may end with, largest first."""
    floor = max(min_keep, 1)
    if not round_to:
        return list(range(size, floor - 1, -1))
    counts = [k for k in range(size - size % round_to, 0, -round_to) if k >= floor]
    return counts or [size]  # no multiple fits: the layer keeps its width


def _uniform(prepared, costs, budget: int, min_keep: int, round_to, *, at_most: bool):
    """One kept count K for every layer (a multiple of round_to): the largest K whose removal
    reaches `budget` (params: cost-weighted; at_most: the largest K removing no more than it)."""
    sizes = [len(s) for s in prepared]
    candidates = _allowed_counts(min(sizes), min_keep, round_to)
    if not candidates or candidates[-1] < max(min_keep, 1):
        raise SelectionError(
            f"uniform layout impossible: a layer has {min(sizes)} units and min_keep={min_keep}"
            + (f", round_to={round_to}" if round_to else "")
        )

    def removed(k: int) -> int:
        return sum((n - k) * c for n, c in zip(sizes, costs))

    if at_most:  # the most removal that stays within the budget
        fitting = [k for k in candidates if removed(k) <= budget]
        k = fitting[-1] if fitting else candidates[0]
    else:
        reaching = [k for k in candidates if removed(k) >= budget]
        k = reaching[0] if reaching else candidates[-1]
    return _build(sizes, [_lowest(s, n - k) for s, n in zip(prepared, sizes)])


def _rounded(prepared, selection: Selection, costs, budget: int, min_keep: int, round_to):
    """Per-layer counts moved to multiples of round_to, the budget still reached.

    Each layer's kept count is rounded to the nearest allowed multiple; then, while the removed
    cost is short of the budget, the layer whose next round_to lowest-ranked kept units score
    lowest (mean, after normalize) gives them up. Overshoot stays below one chunk per layer.
    """
    if not round_to:
        return selection
    sizes = [len(s) for s in prepared]
    keep = []
    for n, kept in zip(sizes, selection.keep):
        allowed = _allowed_counts(n, min_keep, round_to)
        keep.append(min(allowed, key=lambda k: (abs(k - len(kept)), -k)))
    order = [torch.argsort(s, stable=True) for s in prepared]

    def spent() -> int:
        return sum((n - k) * c for n, k, c in zip(sizes, keep, costs))

    while spent() < budget:
        options = []
        for i, (s, n) in enumerate(zip(prepared, sizes)):
            smaller = [k for k in _allowed_counts(n, min_keep, round_to) if k < keep[i]]
            if smaller:
                chunk = order[i][n - keep[i] : n - smaller[0]]
                options.append((float(s[chunk].mean()), i, smaller[0]))
        if not options:
            break
        _, i, k = min(options)
        keep[i] = k
    return _build(sizes, [order[i][: n - k].tolist() for i, (n, k) in enumerate(zip(sizes, keep))])


def select_by_cost(
    scores: Sequence[Tensor],
    unit_costs: Sequence[int],
    params_to_remove: int,
    *,
    min_keep: int = 1,
    normalize: Normalize = "mean",
    uniform: bool = False,
    round_to: int | None = None,
) -> Selection:
    """Remove lowest-scoring units until their parameter cost reaches params_to_remove.

    unit_costs[l] = parameters freed by removing one unit of layer l. Greedy, lowest score
    first (after normalize, ties by (layer, index)): the result is the shortest prefix of that
    order whose cost is >= params_to_remove, so it may overshoot by less than one unit's cost.
    uniform=True keeps the same count K in every layer, the largest K whose removal reaches the
    budget, each layer by its own ranking (serving engines take one width for all layers).
    round_to=N: every kept count is a multiple of N (engines that round FFN widths), the budget
    still reached (overshoot < N units per layer). SelectionError when min_keep leaves too few
    removable parameters.
    """
    prepared = _prepared(scores, normalize, min_keep)
    if len(unit_costs) != len(prepared):
        raise SelectionError(
            f"unit_costs has {len(unit_costs)} entries but scores has {len(prepared)} layers"
        )
    costs = [int(c) for c in unit_costs]
    if any(c <= 0 for c in costs):
        raise SelectionError(f"unit_costs must all be > 0, got {costs}")
    if params_to_remove < 0:
        raise SelectionError(f"params_to_remove must be >= 0, got {params_to_remove}")
    sizes = [len(s) for s in prepared]
    capacity = _capacities(sizes, min_keep)
    if uniform:
        return _uniform(prepared, costs, params_to_remove, min_keep, round_to, at_most=False)
    available = sum(n * c for n, c in zip(capacity, costs))
    if params_to_remove > available:
        raise SelectionError(
            f"cannot remove {params_to_remove} parameters: with min_keep={min_keep} at most "
            f"{available} are removable"
        )
    if params_to_remove == 0:
        return _build(sizes, [[] for _ in sizes])
    layers, indices = _global_order(prepared, capacity)
    spent = torch.cumsum(torch.tensor(costs, dtype=torch.long)[layers], 0)
    n = int(torch.searchsorted(spent, torch.tensor(params_to_remove))) + 1
    selection = _from_order(sizes, layers, indices, n)
    return _rounded(prepared, selection, costs, params_to_remove, min_keep, round_to)
