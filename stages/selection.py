"""Turning importance scores into what to keep: pure, deterministic selection rules.

Why: every structured stage (heads, KV groups, FFN channels, whole layers) ends with the same
question, "which units go?", under a count or a parameter budget, with a floor per layer.
Keeping that logic here, apart from the models, makes it testable on hand-made scores.

Determinism: scores are compared in float64 and ties are broken by (layer, index), lowest first,
so the same scores always give the same selection on every machine.
"""

from __future__ import annotations

import math
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

    @property
    def n_removed(self) -> int:
        """Total number of removed units over all layers."""
        return sum(len(r) for r in self.remove)

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
) -> Selection:
    """Remove the n_remove lowest-scoring units across all layers.

    scores[l] is a 1-D tensor of layer l's unit scores (higher = more important; layers may have
    different unit counts). normalize divides each layer by its mean or max first so layers are
    comparable (needs scores >= 0). No layer keeps fewer than min_keep units (SelectionError if
    n_remove makes that impossible). uniform=True removes n_remove // n_layers units from EVERY
    layer (rounded DOWN: the remainder is not removed), chosen by each layer's own ranking.
    Ties are broken by (layer, index), lowest first.
    """
    prepared = _prepared(scores, normalize, min_keep)
    if n_remove < 0:
        raise SelectionError(f"n_remove must be >= 0, got {n_remove}")
    sizes = [len(s) for s in prepared]
    capacity = _capacities(sizes, min_keep)
    if uniform:
        per_layer = n_remove // len(sizes)
        _check_uniform(per_layer, sizes, capacity, min_keep)
        return _build(sizes, [_lowest(s, per_layer) for s in prepared])
    if n_remove > sum(capacity):
        raise SelectionError(
            f"cannot remove {n_remove} units: {sum(sizes)} units in {len(sizes)} layers with "
            f"min_keep={min_keep} allow at most {sum(capacity)}"
        )
    layers, indices = _global_order(prepared, capacity)
    return _from_order(sizes, layers, indices, n_remove)


def _check_uniform(per_layer: int, sizes: list[int], capacity: list[int], min_keep: int) -> None:
    worst = min(range(len(sizes)), key=lambda i: capacity[i])
    if per_layer > capacity[worst]:
        raise SelectionError(
            f"uniform removal of {per_layer} units per layer impossible: layer {worst} has "
            f"{sizes[worst]} units and min_keep={min_keep} allows removing {capacity[worst]}"
        )


def select_by_cost(
    scores: Sequence[Tensor],
    unit_costs: Sequence[int],
    params_to_remove: int,
    *,
    min_keep: int = 1,
    normalize: Normalize = "mean",
    uniform: bool = False,
) -> Selection:
    """Remove lowest-scoring units until their parameter cost reaches params_to_remove.

    unit_costs[l] = parameters freed by removing one unit of layer l. Greedy, lowest score
    first (after normalize, ties by (layer, index)): the result is the shortest prefix of that
    order whose cost is >= params_to_remove, so it may overshoot by less than one unit's cost.
    uniform=True removes the same count k from every layer, the smallest k whose total cost
    k * sum(unit_costs) reaches the budget, each layer by its own ranking. SelectionError when
    min_keep leaves too few removable parameters.
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
        per_layer = math.ceil(params_to_remove / sum(costs))
        _check_uniform(per_layer, sizes, capacity, min_keep)
        return _build(sizes, [_lowest(s, per_layer) for s in prepared])
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
    return _from_order(sizes, layers, indices, n)


def select_layers(
    scores: Tensor, n_remove: int, *, min_keep: int = 1, higher_is_important: bool = True
) -> list[int]:
    """Indices (sorted) of the n_remove least important layers to drop.

    scores[l] is layer l's importance (e.g. block influence, higher = more important) or, with
    higher_is_important=False, its redundancy. Ties go to the lower index; at least min_keep
    layers remain (SelectionError otherwise).
    """
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    if s.dim() != 1 or not torch.isfinite(s).all():
        raise SelectionError(
            f"layer scores must be a finite 1-D tensor, got shape {tuple(s.shape)}"
        )
    if n_remove < 0 or len(s) - n_remove < min_keep:
        raise SelectionError(
            f"cannot remove {n_remove} of {len(s)} layers and keep min_keep={min_keep}"
        )
    ranked = torch.argsort(s if higher_is_important else -s, stable=True)
    return sorted(ranked[:n_remove].tolist())
