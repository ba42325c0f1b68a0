"""The stage barrier: every executor worker loads the new model version before anything uses it."""

from __future__ import annotations

from runner.run_state import RunContext, RunState


def sync_workers(ctx: RunContext, state: RunState, stage: str | None) -> None:
    """Ship `state.version` (its saved stage directory when there is one) and wait for all workers.

    Importance for the next stage is requested only after this returns, so stage k+1 always scores
    the model that came out of stage k; a worker holding another version refuses to estimate.
    """
    ckpt = ctx.store.model_dir_of(state.version)
    ctx.executor.load_version(state.version, state.model, str(ckpt) if ckpt else None)
    workers = ctx.executor.barrier(state.version)
    ctx.events.emit(
        "barrier",
        stage=stage,
        version=state.version,
        workers=[{"worker": w.worker, "version": w.version} for w in workers],
    )
