"""Layer-streamed structured pruning: prune a model that does not fit in memory.

Why: the in-memory path holds the whole model (and, for Taylor, its activations for backward).
Layer-local criteria only need, per layer, that layer's weights and the statistics of its
out-projection inputs (or its input/output hidden states), so the model can be streamed: the
skeleton lives on the meta device, ONE decoder layer is materialised at a time from the source's
safetensors, and the calibration rows' hidden states are carried from layer to layer
(`stages.streaming.worker`). Global selection needs every layer's scores before cutting, so each
stage is one layer pass over the model as it is after the stages before it, run by the
executor's layer workers (`Executor.layer_passes`: in-process, or Ray actors); the plans come
from the same planning step as the in-memory path (`stages.stage_plan.plan_stage`) and the
scores are bit-for-bit the in-memory ones. A final pass writes the pruned checkpoint
(`stages.streaming.write`). See docs/STREAMING.md.

Entry point: `stream_prune`. `stream_scores` scores one request (used by tests and benchmarks).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cluster.executor import Executor, LocalExecutor
from cluster.layer_passes import Heartbeat, Log, compensate, stream_pass
from stages.arch import model_types_where
from stages.base import PrunePlan, apply_plan, param_count, stage_names
from stages.compensation import adds_out_proj_bias
from stages.estimate import EstimateRequest
from stages.prune_stage import PruneStage, streaming_problems
from stages.stage_plan import PlanLimits, plan_stage
from stages.streaming.worker import LayerSource, StreamSpec
from stages.streaming.write import write_streamed_checkpoint


class StreamingError(ValueError):
    """A streamed pruning request that cannot run (the message says why and what to use instead)."""


def _spill(plan: PrunePlan, work_dir: Path | None, idx: int) -> None:
    """Keep a compensated plan's refit on disk instead of in memory (a model larger than it)."""
    if work_dir is not None and plan.refit is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        plan.refit.spill(work_dir / f"stage{idx:02d}.{PrunePlan.REFIT_FILE}")


def _spec(source_dir, device, compute_dtype, attn_implementation, torch_threads) -> StreamSpec:
    return StreamSpec(
        source_dir=str(source_dir),
        device=str(device),
        compute_dtype=compute_dtype,
        attn_implementation=attn_implementation,
        torch_threads=torch_threads,
    )


def _check_batches(batches: Sequence[dict]) -> list[dict]:
    batches = list(batches)
    if not batches:
        raise StreamingError("calibration_batches is empty; pass at least one micro-batch")
    for n, batch in enumerate(batches):
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        if ids is None or mask is None or ids.dim() != 2 or ids.shape != mask.shape:
            raise StreamingError(
                f"calibration batch {n}: needs 2-D input_ids and attention_mask of one shape "
                "(rows x tokens), as the in-memory calibration batches have"
            )
    return batches


def stream_scores(
    source_dir: str | Path,
    calibration_batches: Sequence[dict],
    request: EstimateRequest,
    *,
    plans: Sequence[PrunePlan] = (),
    executor: Executor | None = None,
    device: str = "cpu",
    compute_dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    torch_threads: int | None = None,
    keep_sums: bool = False,
):
    """Scores of one request on the source cut by `plans`, streamed: (scores, stats).

    `executor` serves the layer pass (default: one in-process worker); it stays open.
    """
    _check_stages([PruneStage(kind=request.granularity, criterion=request.criterion, count=1)])
    executor = executor or LocalExecutor(None)
    spec = _spec(source_dir, device, compute_dtype, attn_implementation, torch_threads)
    passes = executor.layer_passes(spec, _check_batches(calibration_batches))
    try:
        return stream_pass(passes, plans, request, keep_sums=keep_sums)
    finally:
        passes.close()


# ---- plans ---------------------------------------------------------------------------------------
def _check_stages(stages: Sequence[PruneStage], params_target: int | None = None) -> None:
    """Refuse, in one line, what the layer-streamed path cannot run (stages.prune_stage rules)."""
    if not stages:
        raise StreamingError("stages is empty; give at least one PruneStage")
    names = stage_names(stages)
    problems = [text for _, text in streaming_problems(stages, names)]
    for name, stage in zip(names, stages):
        if stage.share is not None and params_target is None:
            problems.append(f"stream stage {name}: share needs params_target (the job's target)")
    if problems:
        raise StreamingError(
            "; ".join(problems) + " (or use the in-memory path on a machine that holds the model:"
            " docs/STREAMING.md)"
        )


def _check_source(source: LayerSource, stages: Sequence[PruneStage]) -> None:
    if not source.adapter.streamable:
        streamable = model_types_where(lambda adapter, _: adapter.streamable)
        raise StreamingError(
            f"{source.checkpoint.directory}: model_type {source.dense.config.model_type!r} is not "
            f"supported by the layer-streamed path (decoders: {', '.join(streamable)}); "
            "use the in-memory path"
        )
    for name, stage in zip(stage_names(stages), stages):
        if stage.compensate == "bias":
            try:
                source.adapter.ensure_out_proj_bias(copy.deepcopy(source.dense), stage.kind)
            except ValueError as err:
                raise StreamingError(f"stream stage {name}: {err}") from None


def stream_prune(
    source_dir: str | Path,
    out_dir: str | Path,
    stages: Sequence[PruneStage],
    calibration_batches: Sequence[dict],
    *,
    seed: int = 0,
    limits: PlanLimits | None = None,
    executor: Executor | None = None,
    device: str = "cpu",
    compute_dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    torch_threads: int | None = None,
    max_shard_size: int | str = "2GB",
    require_uniform: bool = False,
    metadata: dict | None = None,
    work_dir: str | Path | None = None,
    log: Log = print,
) -> list[PrunePlan]:
    """Prune the checkpoint at source_dir stage by stage, streamed; write out_dir; the plans.

    Stages run in order without recovery between them; plan i has version_in = i. `seed` seeds
    torch for parity with the job (the streamed path itself draws no random numbers).
    `executor` serves the layer passes (default: one in-process worker); it stays open, the
    passes it opened are closed.
    """
    torch.manual_seed(seed)
    limits = limits or PlanLimits()
    work_dir = Path(work_dir) if work_dir is not None else None
    _check_stages(stages, limits.params_target)
    batches = _check_batches(calibration_batches)
    source = LayerSource(str(source_dir), attn_implementation)
    _check_source(source, stages)
    adapter = source.adapter
    executor = executor or LocalExecutor(None)
    spec = _spec(source_dir, device, compute_dtype, attn_implementation, torch_threads)
    names = stage_names(stages)
    plans: list[PrunePlan] = []
    model = copy.deepcopy(source.dense)  # meta: shapes, costs and config of the current model
    start = time.monotonic()
    with Heartbeat(log) as beat:
        beat.say(
            f"streamed pruning of {source_dir}: {len(stages)} stage(s), {len(batches)} batches"
        )
        passes = executor.layer_passes(spec, batches)
        try:
            for idx, stage in enumerate(stages):
                request = EstimateRequest(stage.kind, stage.criterion)
                t0 = time.monotonic()
                scores, _ = stream_pass(passes, plans, request, heartbeat=beat)
                plan = plan_stage(
                    model, adapter, stages, idx, scores, limits=limits, version_in=idx
                )
                if stage.compensation.active:
                    beat.status = f"stage {names[idx]}: compensation ({stage.compensate})"
                    compensate(
                        passes, plans, plan, stage.compensation, heartbeat=beat,
                        adds_bias=adds_out_proj_bias(model, adapter, stage),
                    )  # fmt: skip
                    _spill(plan, work_dir, idx)
                apply_plan(model, adapter, plan)
                plans.append(plan)
                beat.say(
                    f"stage {names[idx]} ({stage.kind}, {stage.criterion}): removed "
                    f"{plan.removed_units()} unit(s), {plan.params_to_remove} params; "
                    f"{param_count(model)} left ({time.monotonic() - t0:.1f} s)"
                )
        finally:
            passes.close()
        beat.status = "streamed write"
        write_streamed_checkpoint(
            source,
            plans,
            out_dir,
            max_shard_size=max_shard_size,
            require_uniform=require_uniform,
            metadata=metadata,
            log=beat.say,
        )
        beat.say(f"streamed pruning done in {time.monotonic() - start:.1f} s")
    return plans
