"""Calibration statistics as additive sums, one collector per kind, registered by name.

A criterion (stages/criteria) names the statistics it needs; `collect_statistics` runs those
collectors over a shard's calibration micro-batches. Everything collected is a SUM over tokens or
over fixed micro-batches, kept in float64 on the CPU, so the sums of data shards (Ray workers) add
up to exactly the single-process result: `reduce_statistics` adds them in a fixed order.

Keys: "rows" and "tokens" always; per layer i, "{i}.<name>" as each collector documents. A new
statistic is a class with `name` and `collect(...)` decorated with `register_statistic`.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

from stages import importance as imp
from stages.masking import capture_layer_io, skip_layers, unit_masks
from stages.objectives import Objective, model_device

Stats = dict[str, Tensor]


def add(stats: Stats, key: str, value: Tensor) -> None:
    """stats[key] += value, in float64 on the CPU."""
    value = value.detach().to(torch.float64).cpu()
    stats[key] = stats[key] + value if key in stats else value


class Statistic(Protocol):
    name: ClassVar[str]

    def collect(
        self,
        model: nn.Module,
        adapter,
        batch: dict,
        granularity: str,
        objective: Objective,
        stats: Stats,
    ) -> None:
        """Add this batch's contribution to `stats` (the batch is already on the model's device)."""
        ...


_STATISTICS: dict[str, Statistic] = {}


def register_statistic(cls: type) -> type:
    _STATISTICS[cls.name] = cls()
    return cls


def get_statistic(name: str) -> Statistic:
    return _STATISTICS[name]


@register_statistic
class InputSums:
    """{i}.x_sum, {i}.x_sq_sum: sums over real tokens of the out-projection input X and X**2."""

    name: ClassVar[str] = "input_sums"

    def collect(self, model, adapter, batch, granularity, objective, stats) -> None:
        def record(i: int, x: Tensor) -> None:
            add(stats, f"{i}.x_sum", x.sum(0))
            add(stats, f"{i}.x_sq_sum", (x * x).sum(0))

        _out_proj_inputs(model, adapter, batch, granularity, record)


@register_statistic
class InputGram:
    """{i}.gram: X^T X over real tokens of the out-projection input (COMP-like condition scores)."""

    name: ClassVar[str] = "input_gram"

    def collect(self, model, adapter, batch, granularity, objective, stats) -> None:
        _out_proj_inputs(
            model, adapter, batch, granularity, lambda i, x: add(stats, f"{i}.gram", x.T @ x)
        )


def _out_proj_inputs(model, adapter, batch: dict, granularity: str, record) -> None:
    """One no-grad forward; record(layer, X [real tokens, in] in float32) at every out-projection."""
    token_mask = batch["attention_mask"].bool()
    flat_mask = token_mask.reshape(-1)

    def make_hook(layer_idx: int):
        def hook(_module, args):
            x = args[0]  # [rows, tokens, in], or [rows * tokens, in] where a family flattens (OPT)
            mask = flat_mask if x.dim() == 2 and x.shape[0] == flat_mask.numel() else token_mask
            record(layer_idx, x[mask].to(torch.float32))

        return hook

    with ExitStack() as stack, torch.no_grad():
        for idx, layer in enumerate(adapter.layers(model)):
            handle = adapter.out_proj(layer, granularity).register_forward_pre_hook(make_hook(idx))
            stack.callback(handle.remove)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@register_statistic
class MaskGradients:
    """{i}.mask_grad: d(summed importance loss)/d(unit gate) at gates = 1, signed, per layer."""

    name: ClassVar[str] = "mask_grad"

    def collect(self, model, adapter, batch, granularity, objective, stats) -> None:
        n_layers = len(adapter.layers(model))
        device = model_device(model)
        masks = {
            layer: torch.ones(
                adapter.units(model, layer, granularity), device=device, requires_grad=True
            )
            for layer in range(n_layers)
        }
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            kwargs = {"attn": masks} if granularity == "heads" else {"mlp": masks}
            with unit_masks(model, adapter, **kwargs):
                objective.importance_loss(model, batch).backward()
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)
        for layer, mask in masks.items():
            add(stats, f"{layer}.mask_grad", mask.grad)


@register_statistic
class LayerDistances:
    """{i}.dist_sum: sum over real tokens of 1 - cos(hidden state in, hidden state out) of block i."""

    name: ClassVar[str] = "layer_distance"

    def collect(self, model, adapter, batch, granularity, objective, stats) -> None:
        with torch.no_grad(), capture_layer_io(model, adapter) as io:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for layer in range(len(adapter.layers(model))):
            h_in, h_out = io[layer]
            dist, _ = imp.cosine_distance_stats(h_in, h_out, batch["attention_mask"])
            add(stats, f"{layer}.dist_sum", dist)


@register_statistic
class SkipLosses:
    """loss_sum and {i}.skip_loss_sum: the summed importance loss, and with block i skipped."""

    name: ClassVar[str] = "skip_loss"

    def collect(self, model, adapter, batch, granularity, objective, stats) -> None:
        with torch.no_grad():
            add(stats, "loss_sum", objective.importance_loss(model, batch))
            for layer in range(len(adapter.layers(model))):
                with skip_layers(model, adapter, [layer]):
                    add(stats, f"{layer}.skip_loss_sum", objective.importance_loss(model, batch))


def collect_statistics(
    model: nn.Module,
    adapter,
    batches: Iterable[dict],
    names: Iterable[str],
    granularity: str,
    objective: Objective,
) -> Stats:
    """One pass over this shard's calibration micro-batches; returns the named additive sums."""
    collectors = [get_statistic(name) for name in names]
    stats: Stats = {}
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            add(stats, "rows", torch.tensor(float(batch["input_ids"].shape[0])))
            add(stats, "tokens", batch["attention_mask"].bool().sum())
            for collector in collectors:
                collector.collect(model, adapter, batch, granularity, objective, stats)
    finally:
        model.train(was_training)
    return stats


def reduce_statistics(parts: list[Stats]) -> Stats:
    """Sum shard statistics in the given (fixed) order."""
    total: Stats = {}
    for part in parts:
        for key in sorted(part):
            add(total, key, part[key])
    return total
