"""The compensation pass on a stream worker: one layer at a time, cut, fit, refit, advance.

Why a layer pass: the sequential refit of layer i needs its inputs in the model whose layers
below are already cut and refit, and its targets from the model before the cut. The worker
carries both hidden states from layer to layer (`hidden`: the model before the cut,
`hidden_cut`: the compensated model), so a whole stage costs about two forward passes over the
calibration rows, on one materialised layer at a time (the layer-streamed path's memory bound),
and rows split over workers like every other statistic: per-micro-batch sums
(`stages.compensation.layer_sums`), reduced in global batch order by the driver, fitted once
(`fit`), and the refit sent back to every worker (`advance`).

The in-memory job runs the same pass on its model saved as a checkpoint
(cluster/compensate_model.py), so in-memory, N workers and streamed give the same refit by
construction.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from stages import importance as imp
from stages.base import PrunePlan, set_out_projection
from stages.compensation import CompensationSettings, fit_layer, layer_sums
from stages.statistics import add
from stages.streaming.layer_view import to_layer


class CompensationPass:
    """State of one compensation pass on one worker (its rows), driven layer by layer."""

    def __init__(
        self, worker, plans: Sequence[PrunePlan], plan: PrunePlan, settings: CompensationSettings
    ):
        self.worker, self.plan, self.settings = worker, plan, settings
        self.n_layers = worker.begin_pass(plans, activations=True)
        self.hidden_cut = list(worker.hidden) if settings.inputs == "sequential" else None
        self._before: nn.Module | None = None  # layer i before the cut (None: nothing removed)
        self._outputs: list[Tensor] = []

    @property
    def granularity(self) -> str:
        return self.plan.granularity

    def _kept_columns(self) -> Tensor:
        w = self.worker
        width = w.adapter.unit_width(w.model, self.granularity)
        return imp.unit_columns(self.plan.keep[w.layer_idx], width)

    def step(self, i: int) -> list[tuple[int, dict]]:
        """Load layer i, cut it as planned, and return per-micro-batch sums (none if uncut)."""
        w = self.worker
        w.load_layer(i)
        keep = self.plan.keep[i]
        self._before = None
        if len(keep) < w.adapter.units(w.model, i, self.granularity):
            self._before = copy.deepcopy(w._layer())
            if self.granularity == "heads":
                w.adapter.prune_attention(w.model, i, list(keep))
            else:
                w.adapter.prune_mlp(w.model, i, list(keep))
        self._outputs, parts = [], []
        for b, (idx, batch) in enumerate(w.batches):
            mask = batch["attention_mask"].to(w.device).bool()
            before = w._layer() if self._before is None else self._before
            with (
                torch.no_grad(),
                _out_projection_io(w.adapter, before, self.granularity, mask) as io,
            ):
                self._outputs.append(w._forward(b, before))
            if self._before is None:
                continue
            x_kept = None
            if self.hidden_cut is not None:
                with (
                    torch.no_grad(),
                    _out_projection_io(w.adapter, w._layer(), self.granularity, mask) as cut_io,
                ):
                    w._forward(b, w._layer(), self.hidden_cut[b])
                x_kept = cut_io["x"]
            parts.append((idx, to_layer(_prefixed(layer_sums(io["x"], io["y"], x_kept)), i)))
        return _summed(parts) if w.running_sum else parts

    def fit(self, totals: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict] | None:
        """The loaded layer's refit from the reduced sums: (tensors, summary), None if uncut."""
        if self._before is None:
            return None
        w, i = self.worker, self.worker.layer_idx
        module = w.adapter.out_proj(self._before, self.granularity)
        bias = getattr(module, "bias", None)
        sums = {k.split(".", 1)[1]: v for k, v in totals.items() if k.startswith(f"{i}.")}
        result = fit_layer(
            w.adapter.out_proj_weight(module), bias, self._kept_columns(), sums, self.settings,
            add_bias=self.settings.method == "bias" and bias is None,
        )  # fmt: skip
        tensors = {}
        if result.weight is not None:
            tensors["weight"] = result.weight.to(torch.float32)
        if result.bias is not None:
            tensors["bias"] = result.bias.to(torch.float32)
        return tensors, result.summary()

    def advance(self, tensors: dict[str, Tensor] | None) -> None:
        """Refit the cut layer, carry both hidden states to the next layer, unload."""
        w = self.worker
        if tensors:
            set_out_projection(w.model, w.adapter, w.layer_idx, self.granularity, tensors)
        if self.hidden_cut is not None:
            with torch.no_grad():
                self.hidden_cut = [
                    w._forward(b, w._layer(), h) for b, h in enumerate(self.hidden_cut)
                ]
        w.hidden = self._outputs
        self._before, self._outputs = None, []
        w.unload()


def _prefixed(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """A one-layer view's keys ("0.<name>"), renamed to the layer's own by `to_layer`."""
    return {f"0.{k}": v for k, v in sums.items()}


def _summed(parts: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """One part holding every batch's sums added in batch order (a worker with every batch)."""
    if not parts:
        return []
    total: dict = {}
    for _, part in parts:
        for key, value in part.items():
            add(total, key, value)
    return [(parts[0][0], total)]


@contextmanager
def _out_projection_io(adapter, layer: nn.Module, granularity: str, mask: Tensor):
    """Capture the output projection's input "x" [real tokens, in] and output "y" [.., out]."""
    io: dict[str, Tensor] = {}
    module = adapter.out_proj(layer, granularity)

    def real(t: Tensor) -> Tensor:
        # [rows, tokens, f], or [rows * tokens, f] where a family flattens (OPT)
        return t[mask.reshape(-1) if t.dim() == 2 else mask]

    def pre(_module, args):
        io["x"] = real(args[0])

    def post(_module, _args, output):
        io["y"] = real(output)

    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield io
    finally:
        for handle in handles:
            handle.remove()
