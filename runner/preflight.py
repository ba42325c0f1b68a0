"""Checks that need the loaded model, run before anything is pruned or written.

A job that asks for the impossible (remove every layer, a ratio the embeddings alone exceed, a
device nobody defined) fails here with one line, not hours later.
"""

from __future__ import annotations

from runner.config import JobConfig
from stages.arch import model_types_where
from stages.prune_stage import PruneStage
from stages.units import total_units


class PreflightError(ValueError):
    pass


def preflight(
    cfg: JobConfig, ref: str, model, adapter, dense_params: int, params_target: int | None
) -> None:
    problems = []
    n_layers = len(adapter.layers(model))
    t = cfg.target
    min_keep = {
        "layers": t.min_keep_layers,
        "heads": t.min_keep_heads,
        "channels": t.min_keep_channels,
    }
    for i, stage in enumerate(cfg.stages):
        if not isinstance(stage, PruneStage) or stage.count is None:
            continue
        units = total_units(model, adapter, stage.kind)
        keep = min_keep[stage.kind] * (1 if stage.kind == "layers" else n_layers)
        if stage.count > units - keep:
            problems.append(
                f"stages.{i}.count: removing {stage.count} {stage.kind} would leave fewer than "
                f"{keep} of the model's {units}"
            )
    if params_target is not None:
        block = sum(adapter.layer_cost(model, i) for i in range(n_layers))
        fixed = dense_params - block  # embeddings, final norm, classifier: never pruned
        if params_target <= fixed:
            problems.append(
                f"target: needs at most {params_target:,} params but the unprunable part "
                f"(embeddings, head) alone has {fixed:,}; lower target.ratio (max ~{dense_params / fixed:.1f}x "
                "without any layer left)"
            )
    problems += _compensation_problems(cfg, model, adapter)
    if problems:
        raise PreflightError(f"model {ref}: " + "; ".join(problems))


def _compensation_problems(cfg: JobConfig, model, adapter) -> list[str]:
    """Compensation refits through a layer pass (cluster/layer_passes.py), which runs only the
    families the streamed path runs."""
    if adapter.streamable:
        return []
    decoders = ", ".join(model_types_where(lambda a, _: a.streamable))
    model_type = getattr(model.config, "model_type", "?")
    return [
        f"stages.{i}.compensate: {stage.compensate} refits layer by layer, which model type "
        f"{model_type} does not support (only {decoders}); use compensate: none"
        for i, stage in enumerate(cfg.stages)
        if isinstance(stage, PruneStage) and stage.compensate != "none"
    ]
