"""The Criterion protocol and the registry of criteria by name (the config's allowed names)."""

from __future__ import annotations

from typing import ClassVar, Protocol

from torch import Tensor, nn

GRANULARITIES = ("layers", "heads", "channels")


class Criterion(Protocol):
    """How important each unit (layer, head/KV group, FFN channel) is, from additive statistics.

    `statistics` names what `collect_statistics` gathers for it (stages/statistics.py); `score`
    turns the reduced sums into scores: a [layers] tensor for the layers granularity, else one
    [units] tensor per layer. Higher score = more important. `layer_local`: every statistic is
    computed from one layer's own inputs (no backward pass through the model), so a layer-streamed
    calibration can compute it too.
    """

    name: ClassVar[str]
    granularities: ClassVar[tuple[str, ...]]
    statistics: ClassVar[tuple[str, ...]]
    layer_local: ClassVar[bool]

    def score(
        self, model: nn.Module, adapter, stats: dict[str, Tensor], granularity: str
    ) -> Tensor | list[Tensor]: ...


_CRITERIA: dict[str, Criterion] = {}


def register_criterion(cls: type) -> type:
    """Class decorator: one shared stateless instance per criterion name."""
    _CRITERIA[cls.name] = cls()
    return cls


def get_criterion(name: str) -> Criterion:
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ValueError(
            f"unknown criterion {name!r}; known: {', '.join(sorted(_CRITERIA))}"
        ) from None


def criteria_for(granularity: str) -> tuple[str, ...]:
    """Names of the criteria that can score `granularity`, in registration order."""
    return tuple(n for n, c in _CRITERIA.items() if granularity in c.granularities)


def out_projection_weight(model, adapter, layer_idx: int, granularity: str) -> Tensor:
    """[out, in] weight of the module whose input columns hold layer i's units."""
    layer = adapter.layers(model)[layer_idx]
    return adapter.out_proj_weight(adapter.out_proj(layer, granularity))
