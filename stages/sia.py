"""Structural Independence Assumption (SIA) check: can per-component pruning scores be trusted?

Per-component criteria rank heads/channels by their individual effect, which is only meaningful
if removing two components costs about the sum of their individual costs (additivity) and if a
component's score does not change much when others are removed (stability). Components are the
finest natural ones: single query heads (even under GQA, where query heads share a KV head) and
single FFN channels (gate+up+down together for SwiGLU). See docs/SIA.md.

    additivity A = median over random same-layer pairs of |dL(a,b) - dL(a) - dL(b)| / (|dL(a)| + |dL(b)|)
    stability  S = 1 - Spearman(scores on the full model, scores after masking a random fraction)
    score      = max over granularities of (A + S) / 2;   satisfied  <=>  score <= threshold
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import torch

from stages.importance import normalised_interaction, spearman
from stages.objectives import Objective

Component = tuple[int, int]  # (layer, component index)
LossFn = Callable[[list[Component]], float]  # loss with these components removed


# ------------------------------------------------------------------ pure measurements
def additivity(
    loss_fn: LossFn, components_by_layer: list[int], pairs: int, rng: random.Random
) -> dict:
    """Normalised interaction of random same-layer pairs (0 when effects add up exactly)."""
    base = loss_fn([])
    values = []
    layers = [i for i, n in enumerate(components_by_layer) if n >= 2]
    for _ in range(pairs):
        layer = rng.choice(layers)
        a, b = rng.sample(range(components_by_layer[layer]), 2)
        dl_a = loss_fn([(layer, a)]) - base
        dl_b = loss_fn([(layer, b)]) - base
        dl_ab = loss_fn([(layer, a), (layer, b)]) - base
        as64 = [torch.tensor(v, dtype=torch.float64) for v in (dl_ab, dl_a, dl_b)]
        values.append(float(normalised_interaction(*as64)))
    t = torch.tensor(values, dtype=torch.float64)
    return {"median": float(t.median()), "p90": float(torch.quantile(t, 0.9)), "pairs": len(values)}


def stability(
    score_fn: Callable[[list[Component]], dict[Component, float]],
    components_by_layer: list[int],
    fraction: float,
    rng: random.Random,
) -> dict:
    """Spearman between scores on the full model and after removing a random `fraction` of components."""
    everything = [(layer, c) for layer, n in enumerate(components_by_layer) for c in range(n)]
    removed = set(rng.sample(everything, max(1, int(fraction * len(everything)))))
    full = score_fn([])
    after = score_fn(sorted(removed))
    kept = [c for c in everything if c not in removed]
    rho = spearman(torch.tensor([full[c] for c in kept]), torch.tensor([after[c] for c in kept]))
    rho = 0.0 if rho != rho else rho  # NaN (constant scores) -> no information -> 0
    return {"spearman": rho, "removed": len(removed), "compared": len(kept)}


def combine(per_granularity: dict[str, dict], threshold: float) -> dict:
    parts = {
        g: (m["additivity"]["median"] + (1.0 - m["stability"]["spearman"])) / 2
        for g, m in per_granularity.items()
    }
    score = max(parts.values())
    return {
        "score": score,
        "threshold": threshold,
        "satisfied": score <= threshold,
        "per_granularity": parts,
        "details": per_granularity,
    }


# ------------------------------------------------------------------ model wiring
def components_per_layer(model, adapter, granularity: str) -> list[int]:
    layers = adapter.layers(model)
    if granularity == "heads":
        return [
            adapter.attn_units(model, i) * adapter.heads_per_unit(model) for i in range(len(layers))
        ]
    return [adapter.mlp_units(model, i) for i in range(len(layers))]


@contextmanager
def component_masks(model, adapter, granularity: str, masks: dict[int, torch.Tensor]):
    """Scale out-projection input columns per component (query head = head_dim columns)."""
    width = adapter.head_dim(model) if granularity == "heads" else 1
    layers = adapter.layers(model)
    with ExitStack() as stack:
        for layer_idx, mask in masks.items():
            module = adapter.out_proj(layers[layer_idx], granularity)

            def hook(_m, args, mask=mask):
                scale = mask.repeat_interleave(width).to(args[0].dtype)
                return (args[0] * scale,) + tuple(args[1:])

            stack.callback(module.register_forward_pre_hook(hook).remove)
        yield


def _loss(model, batches, objective: Objective) -> torch.Tensor:
    total = 0.0
    for b in batches:
        total = total + objective.importance_loss(model, b)
    return total


def _masks_for(
    removed: list[Component], counts: list[int], device, requires_grad=False
) -> dict[int, torch.Tensor]:
    masks = {i: torch.ones(n, device=device) for i, n in enumerate(counts)}
    for layer, c in removed:
        masks[layer][c] = 0.0
    if requires_grad:
        for m in masks.values():
            m.requires_grad_(True)
    return masks


def sample_batches(batches: list[dict], cfg) -> list[dict]:
    """The first cfg.batches calibration batches, each cut to cfg.rows rows and cfg.max_tokens
    tokens: every loss evaluation is a forward pass, so its cost scales with what is kept."""
    rows, tokens = getattr(cfg, "rows", None), getattr(cfg, "max_tokens", None)
    kept = []
    for batch in batches[: getattr(cfg, "batches", 2)]:
        cut = {}
        for key, value in batch.items():
            value = value[:rows] if rows else value
            if tokens and key in ("input_ids", "attention_mask") and value.dim() == 2:
                value = value[:, :tokens]
            cut[key] = value
        kept.append(cut)
    return kept


def run_sia(
    model,
    adapter,
    batches: list[dict],
    cfg,
    objective: Objective,
    *,
    seed: int = 0,
) -> dict:
    """Measure additivity and stability for heads and channels on the calibration batches."""
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in sample_batches(batches, cfg)]
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    per = {}
    try:
        for granularity in ("heads", "channels"):
            counts = components_per_layer(model, adapter, granularity)

            def loss_fn(removed, counts=counts, granularity=granularity):
                with (
                    torch.no_grad(),
                    component_masks(
                        model, adapter, granularity, _masks_for(removed, counts, device)
                    ),
                ):
                    return float(_loss(model, batches, objective))

            def score_fn(removed, counts=counts, granularity=granularity):
                masks = _masks_for(removed, counts, device, requires_grad=True)
                with torch.enable_grad(), component_masks(model, adapter, granularity, masks):
                    _loss(model, batches, objective).backward()
                return {
                    (i, c): float(m.grad[c].abs()) for i, m in masks.items() for c in range(len(m))
                }

            per[granularity] = {
                "components": sum(counts),
                "additivity": additivity(loss_fn, counts, cfg.pairs, rng),
                "stability": stability(score_fn, counts, cfg.removal_fraction, rng),
            }
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    result = combine(per, cfg.threshold)
    result["policy"] = cfg.policy
    return result
