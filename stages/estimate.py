"""Calibration statistics for importance estimation.

Everything collected here is a SUM over tokens or over fixed calibration micro-batches, so
statistics from data shards (Ray workers) add up to exactly the single-process result:
`reduce_statistics` sums them in a fixed order, `scores_from_statistics` turns the total into
per-unit scores with the pure functions of `stages.importance`.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from stages import importance as imp
from stages.masking import capture_layer_io, skip_layers, unit_masks
from stages.objective import summed_loss as _summed_loss

Stats = dict[str, torch.Tensor]

NEEDS_GRAD = {"taylor"}
NEEDS_INPUT_STATS = {"wanda", "activation", "fluctuation"}


@dataclass(frozen=True)
class EstimateRequest:
    granularity: str  # layers | heads | channels
    criterion: str


def _token_mask(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].bool()


def _add(stats: Stats, key: str, value: torch.Tensor) -> None:
    value = value.detach().to(torch.float64).cpu()
    stats[key] = stats[key] + value if key in stats else value


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def collect_statistics(model, adapter, batches: Iterable[dict], request: EstimateRequest) -> Stats:
    """One pass over this shard's calibration micro-batches; returns additive sums."""
    stats: Stats = {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = _to_device(batch, device)
            _add(stats, "rows", torch.tensor(float(batch["input_ids"].shape[0])))
            _add(stats, "tokens", _token_mask(batch).sum())
            if request.granularity == "layers":
                _layer_batch(model, adapter, batch, request.criterion, stats)
            elif request.criterion in NEEDS_GRAD:
                _taylor_batch(model, adapter, batch, request.granularity, stats)
            elif request.criterion in NEEDS_INPUT_STATS or request.criterion == "condition":
                _input_stats_batch(model, adapter, batch, request, stats)
            # l2 needs no data: weights only
    finally:
        model.train(was_training)
    return stats


def _layer_batch(model, adapter, batch, criterion: str, stats: Stats) -> None:
    n_layers = len(adapter.layers(model))
    with torch.no_grad():
        if criterion == "block_influence":
            with capture_layer_io(model, adapter) as io:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for layer in range(n_layers):
                h_in, h_out = io[layer]
                dist, _ = imp.cosine_distance_stats(h_in, h_out, batch["attention_mask"])
                _add(stats, f"{layer}.dist_sum", dist)
        else:  # loss_delta: loss increase when the layer is skipped
            _add(stats, "loss_sum", _summed_loss(model, batch))
            for layer in range(n_layers):
                with skip_layers(model, adapter, [layer]):
                    _add(stats, f"{layer}.skip_loss_sum", _summed_loss(model, batch))


def _taylor_batch(model, adapter, batch, granularity: str, stats: Stats) -> None:
    """Group-level first-order Taylor (LLM-Pruner's vector-wise form) via unit-mask gradients."""
    n_layers = len(adapter.layers(model))
    device = next(model.parameters()).device
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
            loss = _summed_loss(model, batch)
            loss.backward()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    for layer, mask in masks.items():
        _add(stats, f"{layer}.mask_grad", mask.grad)


def _input_stats_batch(model, adapter, batch, request: EstimateRequest, stats: Stats) -> None:
    token_mask = _token_mask(batch)
    layers = adapter.layers(model)

    def make_hook(layer_idx: int):
        def hook(_module, args):
            x = args[0][token_mask].to(torch.float32)  # [tokens, in]
            if request.criterion == "condition":
                _add(stats, f"{layer_idx}.gram", x.T @ x)
            _add(stats, f"{layer_idx}.x_sum", x.sum(0))
            _add(stats, f"{layer_idx}.x_sq_sum", (x * x).sum(0))

        return hook

    with ExitStack() as stack, torch.no_grad():
        for idx, layer in enumerate(layers):
            handle = adapter.out_proj(layer, request.granularity).register_forward_pre_hook(
                make_hook(idx)
            )
            stack.callback(handle.remove)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def reduce_statistics(parts: list[Stats]) -> Stats:
    """Sum shard statistics in the given (fixed) order."""
    total: Stats = {}
    for part in parts:
        for key in sorted(part):
            _add(total, key, part[key])
    return total


def scores_from_statistics(model, adapter, stats: Stats, request: EstimateRequest):
    """Per-layer scores: a [layers] tensor for layer pruning, else a list of [units] tensors."""
    n_layers = len(adapter.layers(model))
    if request.granularity == "layers":
        if request.criterion == "block_influence":
            tokens = stats["tokens"]
            return torch.tensor(
                [imp.block_influence(stats[f"{i}.dist_sum"], tokens) for i in range(n_layers)]
            )
        base = stats["loss_sum"]
        return torch.stack(
            [(stats[f"{i}.skip_loss_sum"] - base) / stats["rows"] for i in range(n_layers)]
        )
    width = adapter.unit_width(model, request.granularity)
    layers = adapter.layers(model)
    scores = []
    for i in range(n_layers):
        crit = request.criterion
        if crit == "l2":
            views = (
                adapter.attn_unit_weights(model, i)
                if request.granularity == "heads"
                else adapter.mlp_unit_weights(model, i)
            )
            score = imp.l2_magnitude(views)
        elif crit == "taylor":
            score = stats[f"{i}.mask_grad"].abs()
        else:
            weight = adapter.out_proj_weight(adapter.out_proj(layers[i], request.granularity))
            count = stats["tokens"]
            if crit == "wanda":
                score = imp.wanda(weight, stats[f"{i}.x_sq_sum"], count, width)
            elif crit == "activation":
                score = imp.activation_norm(stats[f"{i}.x_sq_sum"], count, width)
            elif crit == "fluctuation":
                score = imp.fluctuation(
                    weight, stats[f"{i}.x_sum"], stats[f"{i}.x_sq_sum"], count, width
                )
            elif crit == "condition":
                score = imp.condition_scores(weight, stats[f"{i}.gram"], width)
            else:
                raise ValueError(f"unknown criterion {crit!r}")
        scores.append(score.detach().to(torch.float64).cpu())
    return scores


def estimate_locally(model, adapter, batches, request: EstimateRequest):
    """Single-process path: collect, (trivially) reduce, score."""
    stats = reduce_statistics([collect_statistics(model, adapter, batches, request)])
    return scores_from_statistics(model, adapter, stats, request), stats
