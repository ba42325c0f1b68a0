"""Compensation and the no-recovery cascade for a model held in memory.

Why through a layer pass: the refit of a layer needs its inputs in the model cut so far and its
targets from the model before the cut, layer by layer. The layer-streamed path already carries
hidden states that way, bit-for-bit like the in-memory forward, so an in-memory model is saved as
a checkpoint (a temporary directory) and the same pass runs on it (`cluster.layer_passes.
compensate`): the job, `prune_in_memory`, N stream workers and a streamed run cannot compute
different refits. The pass runs in this process (`LocalLayerPasses`, one worker) whatever the
job's executor: the model lives in the driver's memory and its temporary copy on the driver's
disk, which a remote Ray worker may not see.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from cluster.layer_passes import LocalLayerPasses, compensate
from stages.base import PrunePlan, apply_plan
from stages.checkpoint import save_checkpoint
from stages.compensation import adds_out_proj_bias
from stages.estimate import EstimateRequest, estimate_locally
from stages.prune_stage import PruneStage
from stages.stage_plan import PlanLimits, plan_stage
from stages.streaming.worker import StreamSpec


def compensate_model(
    model,
    adapter,
    plan: PrunePlan,
    stage: PruneStage,
    batches: Sequence[dict],
    *,
    work_dir: str | Path | None = None,
    log=None,
) -> None:
    """Fill plan.refit / plan.compensation for `plan` made on `model` (not cut yet)."""
    if not stage.compensation.active or plan.granularity == "layers":
        return
    tmp = Path(tempfile.mkdtemp(prefix=".compensate-", dir=work_dir))
    try:
        save_checkpoint(model, None, tmp / "model")
        spec = StreamSpec(
            source_dir=str(tmp / "model"),
            device=str(next(model.parameters()).device),
            compute_dtype=torch.float32,
            attn_implementation=getattr(model.config, "_attn_implementation", None),
            torch_threads=torch.get_num_threads(),
        )
        rows = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
        passes = LocalLayerPasses(spec, rows)
        try:
            compensate(
                passes, (), plan, stage.compensation,
                adds_bias=adds_out_proj_bias(model, adapter, stage),
            )  # fmt: skip
        finally:
            passes.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log is not None:
        errors = plan.compensation["layers"].values()
        before = sum(e["error_before"] for e in errors) / max(len(errors), 1)
        after = sum(e["error_after"] for e in errors) / max(len(errors), 1)
        log(
            f"{plan.stage}: {stage.compensate} compensation of {len(errors)} layer(s), "
            f"calibration output error {before:.4f} -> {after:.4f} (mean relative)"
        )


def prune_in_memory(
    model, adapter, stages: Sequence[PruneStage], batches: Sequence[dict], limits: PlanLimits
) -> list[PrunePlan]:
    """The stages without recovery on a model held in memory: estimate, plan, compensate, apply.

    The reference the streamed path must match plan for plan (tests, benchmarks/streaming.py).
    """
    plans = []
    for idx, stage in enumerate(stages):
        request = EstimateRequest(stage.kind, stage.criterion)
        scores, _ = estimate_locally(model, adapter, batches, request)
        plan = plan_stage(model, adapter, stages, idx, scores, limits=limits, version_in=idx)
        compensate_model(model, adapter, plan, stage, batches)
        apply_plan(model, adapter, plan)
        plans.append(plan)
    return plans
