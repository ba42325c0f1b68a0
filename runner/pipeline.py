"""One model's cascade: calibrate -> SIA -> [prune -> recover]* -> export -> evaluate the export.

Importance for a prune stage is requested only after the previous stage finished and every
executor worker has loaded the resulting model version (the barrier), so stage k+1 always scores
the model that came out of recovery k.
"""

from __future__ import annotations

import time
from pathlib import Path

from runner.config import JobConfig, ModelConfig, stage_names
from runner.errors import JobError
from runner.finish import export_and_evaluate
from runner.progress import still_working
from runner.prune import estimate_dense_upfront, prune
from runner.recovery import recover_stage
from runner.resume import restore_teachers, stage_settings
from runner.run_state import RunContext, RunState
from runner.setup_run import start_run
from runner.streamed import start_streamed_run, stream_prune_stages
from runner.workers import sync_workers
from stages.arch import get_adapter
from stages.base import param_count
from stages.checkpoint import load_pruned
from stages.prune_stage import PruneStage
from stages.sia import run_sia
from stages.training import flush_denormals


def run_model(cfg: JobConfig, model_cfg: ModelConfig, out: Path, *, resume: bool, log) -> dict:
    """Compress one model of a job into `out`; returns its report (report.json's content).

    Denormals are flushed for the whole run: on CPU they slowed SmolLM2 evaluation and training
    4-10x and change nothing above ~1e-38 (stages.training.flush_denormals)."""
    with flush_denormals():
        return _run_model(cfg, model_cfg, out, resume=resume, log=log)


def _run_model(cfg: JobConfig, model_cfg: ModelConfig, out: Path, *, resume: bool, log) -> dict:
    start = time.perf_counter()
    streamed = cfg.calibration.streamed
    if streamed:
        ctx, state, source = start_streamed_run(cfg, model_cfg, Path(out), log)
    else:
        ctx, state = start_run(cfg, model_cfg, Path(out), log)
    ctx.store.settings = stage_settings(cfg, model_cfg)  # kept in every stage, checked on resume
    try:
        first = _restore(ctx, state) if resume else _begin(ctx)
        if streamed and first == 0:
            first = stream_prune_stages(ctx, state, source)
        sync_workers(ctx, state, None)
        if first == 0:
            estimate_dense_upfront(ctx, state)
        sia = _check_sia(ctx, state) if first == 0 else ctx.store.load_extra("sia") or {}
        steps = cfg.sia.shrink_steps if _sia_shrinks(cfg, sia) else 1
        for idx, (stage, name) in enumerate(zip(cfg.stages, stage_names(cfg.stages))):
            if idx >= first:
                _run_stage(ctx, state, idx, stage, name, steps)
        return export_and_evaluate(ctx, state, sia, start)
    finally:
        ctx.executor.close()


def _run_stage(ctx: RunContext, state: RunState, idx: int, stage, name: str, steps: int) -> None:
    t0 = time.perf_counter()
    if isinstance(stage, PruneStage):
        plans, before = prune(ctx, state, idx, stage, name, steps)
        extra = {"plan": plans}
    else:
        before, metrics = recover_stage(ctx, state, idx, stage, name)
        extra = {"recovery": metrics}
    record = _record(ctx, state, idx, stage, name, before, time.perf_counter() - t0)
    saved = state.model if ctx.cfg.output.save_stage_models else None
    ctx.store.save(idx, name, saved, ctx.tokenizer, record, extra)
    state.records.append(record)


def _record(ctx: RunContext, state: RunState, idx, stage, name, before, seconds) -> dict:
    metrics = ctx.task.stage_metrics(state.model, ctx.data)
    return {
        "index": idx,
        "name": name,
        "kind": stage.kind,
        "version": state.version,
        "params_before": before["params"],
        "params_after": param_count(state.model),
        **metrics.model_dump(exclude_none=True),
        "seconds": round(seconds, 3),
        "criterion": getattr(stage, "criterion", None),
        "layer_origin": list(state.layer_origin),
    }


def _begin(ctx: RunContext) -> int:
    dense = ctx.dense
    ctx.events.emit(
        "job_start",
        version=0,
        model=dense.info,
        dense_params=dense.params,
        dense_accuracy=ctx.task.headline(dense.measures) if dense.measures else None,
        finetune=dense.finetune,
        warnings=dense.warnings,
    )
    return 0


def _restore(ctx: RunContext, state: RunState) -> int:
    """Continue after the last finished stage: its saved model, records and layer origins."""
    found = ctx.store.last_complete()
    if found is None:
        ctx.events.emit("job_start", version=0, model=ctx.dense.info, resumed=True)
        return 0
    idx, model_dir, records = found
    if model_dir is None:
        raise JobError(
            "cannot --resume: stage models were not saved (output.save_stage_models=false)"
        )
    attn = state.model.config._attn_implementation if state.model is not None else None
    dense_model = state.model
    state.model = load_pruned(model_dir, attn_implementation=attn)
    state.adapter = get_adapter(state.model)
    state.records = records
    state.version = records[-1]["version"]
    state.layer_origin = records[-1]["layer_origin"]
    restore_teachers(ctx, state, idx + 1, dense_model)
    ctx.events.emit("resume", version=state.version, after_stage=records[-1]["name"])
    ctx.log(
        f"resuming {ctx.model_cfg.ref} after stage {records[-1]['name']} (version {state.version})"
    )
    return idx + 1


def _check_sia(ctx: RunContext, state: RunState) -> dict:
    cfg = ctx.cfg
    if not cfg.sia.enabled:
        return {}
    with still_working(f"{ctx.model_cfg.ref}: SIA check", ctx.log):
        result = run_sia(
            state.model, state.adapter, ctx.calibration, cfg.sia, ctx.task.objective, seed=cfg.seed
        )
    ctx.events.emit("sia", version=state.version, **result)
    ctx.store.save_extra("sia", result)
    if not result["satisfied"]:
        ctx.log(
            f"WARNING: SIA violated for {ctx.model_cfg.ref} (score {result['score']:.3f} > "
            f"threshold {result['threshold']}): per-component scores are unreliable; "
            f"policy={cfg.sia.policy}"
        )
        if cfg.sia.policy == "stop":
            raise JobError(f"SIA violated (score {result['score']:.3f}) and sia.policy is stop")
    return result


def _sia_shrinks(cfg: JobConfig, sia: dict) -> bool:
    return bool(sia) and not sia.get("satisfied", True) and cfg.sia.policy == "shrink"
