"""End of a model's cascade: export ONE checkpoint, reload it, evaluate what was exported, report."""

from __future__ import annotations

import time

from cluster.shards import export_sharded
from runner.engines import engine_support
from runner.errors import JobError
from runner.progress import still_working
from runner.report.job import write_job_html, write_report
from runner.report.model import Report
from runner.run_state import RunContext, RunState
from runner.validate import ValidationFailed, check_fits, validate_for_job
from stages.base import param_count
from stages.checkpoint import DiskFullError, load_pruned, save_checkpoint


def export_and_evaluate(ctx: RunContext, state: RunState, sia: dict, start: float) -> dict:
    """Write the checkpoint, measure the reloaded export, write the report; returns it as a dict.

    A model that does not fit its target device fails the job AFTER its report is written.
    """
    _export(ctx, state)
    # Evaluate the exported files, not the in-memory model: the report claims what the checkpoint does.
    exported = load_pruned(ctx.out / "checkpoint")
    with still_working(f"{ctx.model_cfg.ref}: measuring the exported checkpoint", ctx.log):
        final = ctx.task.measure(exported, ctx.data)
    validation = None
    if ctx.cfg.target.device is not None:
        validation = validate_for_job(exported, ctx.dense.params, ctx.cfg, ctx.model_cfg)
        ctx.events.emit("validate", version=state.version, **validation)
    perplexity = ctx.perplexity.measure(exported) if ctx.perplexity else None
    report = build_report(ctx, state, sia, final, exported, validation, perplexity)
    report.timing.total_seconds = round(time.perf_counter() - start, 2)
    data = report.to_json()
    write_report(ctx.out, report, plots=ctx.cfg.output.plots)
    if ctx.cfg.output.plots:
        write_job_html(ctx.out, report)
    if validation is not None:
        try:
            check_fits(validation)
        except ValidationFailed as exc:
            ctx.events.emit("error", version=state.version, stage="validate", error=str(exc))
            raise
    ctx.events.emit(
        "job_end",
        version=state.version,
        compression_ratio=report.final.compression_ratio,
        accuracy=report.final.accuracy,
    )
    return data


def _export(ctx: RunContext, state: RunState) -> None:
    cfg, ckpt_dir = ctx.cfg, ctx.out / "checkpoint"
    t0 = time.perf_counter()
    meta = {"job": cfg.name, "source_model": ctx.model_cfg.ref, "dense_params": ctx.dense.params}
    if ctx.dense.layout is not None:  # the report's dense column, whatever the source was
        meta["dense_layout"] = ctx.dense.layout
    options = dict(require_uniform=cfg.target.uniform, metadata=meta)
    try:
        if cfg.cluster.executor == "ray":  # workers write layer-range shards, merged into one
            workers = ctx.executor.workers
            export_sharded(state.model, ctx.tokenizer, ckpt_dir, workers, ctx.executor, **options)
        else:
            save_checkpoint(state.model, ctx.tokenizer, ckpt_dir, **options)
    except (OSError, DiskFullError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        ctx.events.emit("error", version=state.version, stage="export", error=error)
        if isinstance(exc, DiskFullError):  # names the space the weights need and what is free
            raise JobError(
                f"{exc}; any previous checkpoint there is intact and the stage models are kept: "
                "rerun with --resume once there is room"
            ) from None
        raise JobError(
            f"export to {ckpt_dir} failed ({exc.strerror or exc}); any previous checkpoint there is "
            "intact and the stage models are kept: fix the cause and rerun with --resume"
        ) from None
    elapsed = time.perf_counter() - t0
    ctx.events.emit("export", version=state.version, path=str(ckpt_dir), seconds=elapsed)


def build_report(
    ctx: RunContext, state: RunState, sia: dict, final, exported, validation, perplexity
) -> Report:
    """The Report of this run: the task's figures (a streamed run never measured the dense
    model: ctx.dense.measures is None and the task leaves its dense side empty) on the shared
    ones."""
    dense, params = ctx.dense, param_count(exported)
    shared = {
        "params": params,
        "dense_params": dense.params,
        "compression_ratio": dense.params / params,
        "dense_finetune": dense.finetune,
        "checkpoint": str(ctx.out / "checkpoint"),
    }
    if perplexity is not None:
        shared["perplexity"] = perplexity | {"dense": dense.perplexity["perplexity"]}
    shared["engines"] = engine_support(exported.config.model_type, exported.config.pruning)
    return Report.model_validate(
        {
            "task": ctx.task.name,
            "model": dense.info,
            "sia": sia,
            "warnings": dense.warnings + _target_warnings(ctx, params) + ctx.executor.warnings,
            "stages": state.records,
            "final": ctx.task.final_figures(final, dense.measures, shared),
            "validation": validation,
            "timing": {
                "total_seconds": 0.0,
                "per_stage": {r["name"]: r["seconds"] for r in state.records},
            },
            "job": {
                "name": ctx.cfg.name,
                "seed": ctx.cfg.seed,
                "executor": ctx.cfg.cluster.executor,
                "workers": ctx.executor.workers,
            },
        }
    )


def _target_warnings(ctx: RunContext, params: int) -> list[str]:
    """Say by how much a ratio target was missed (layout constraints or min_keep floors)."""
    ratio, dense = ctx.cfg.target.ratio, ctx.dense.params
    if ratio is None or dense / params >= ratio * 0.99:
        return []
    t = ctx.cfg.target
    rules = f"layout={t.layout}, round_to={t.round_to}, keep_attention={t.keep_attention}"
    return [
        f"target {ratio:g}x not reached: {dense / params:.2f}x, {params - int(dense / ratio):,} "
        f"parameters over; the constraints ({rules}) and min_keep floors left no more to remove"
    ]
