"""One decoder layer seen as a whole model, so registered statistics and criteria run on it.

Why: the layer-streamed path holds one layer at a time. Instead of re-implementing each
criterion's statistics and scoring for that case, the stream worker wraps the loaded layer in a
`LayerView`: `adapter.layers(view)` is `[layer]` (the family's own path to its layers is rebuilt
inside the view), and calling the view runs the layer on the carried hidden states of the
current micro-batch. A registered `Statistic.collect` (forward hooks on the layer's modules) and
a criterion's `score` (weights read through the adapter) then work unchanged, so a criterion is
streamable by construction. Statistics come back keyed "0.<name>"; `to_layer` / `from_layer`
rename them to the layer's place in the model.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from stages.arch.base import backbone, unwrap_model
from stages.streaming.lazy_weights import module_name


class LayerView(nn.Module):
    """`layer` as the only layer of a model whose forward is `run()` (inputs are ignored)."""

    base_model_prefix = ""  # the view is its own backbone

    def __init__(self, model: nn.Module, adapter, layer: nn.Module, run: Callable[[], Tensor]):
        super().__init__()
        path = module_name(backbone(model), adapter.layers(model)).split(".")
        holder: nn.Module = self
        for part in path[:-1]:
            holder.add_module(part, nn.Module())
            holder = getattr(holder, part)
        holder.add_module(path[-1], nn.ModuleList([layer]))
        self.config = unwrap_model(model).config
        self._run = run

    def forward(self, *_args, **_kwargs) -> Tensor:
        return self._run()


def to_layer(stats: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """A view's statistics ("0.x") under layer i's keys ("i.x"); model-wide keys unchanged."""
    return {_rekey(k, "0", str(i)): v for k, v in stats.items()}


def from_layer(stats: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """Layer i's statistics as a view reads them ("i.x" -> "0.x"); other layers' keys dropped."""
    prefix = f"{i}."
    return {
        (k if "." not in k else "0." + k[len(prefix) :]): v
        for k, v in stats.items()
        if "." not in k or k.startswith(prefix)
    }


def _rekey(key: str, old: str, new: str) -> str:
    head, dot, rest = key.partition(".")
    return f"{new}.{rest}" if dot and head == old else key
