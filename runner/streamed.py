"""`calibration.streamed: true`: the prune stages of a job run layer-streamed (cluster/stream_prune).

For a model that does not fit in memory: the dense model is never loaded whole. Every prune stage
(they must all come before any recover stage, with layer-local criteria) streams the checkpoint
one decoder layer at a time from its safetensors files; the pruned checkpoint is written layer by
layer into the last prune stage's directory, then loaded (it is smaller) and recovered, exported
and evaluated like any job's. What needs the dense model whole is not measured: the SIA check
and the dense model's own figures (the report says so).

The layer passes run on an executor of the job's kind (`cluster.executor`: in-process, or Ray
actors), open for the streamed stages only. The run's own executor stays a LocalExecutor: a
streamed run estimates nothing after its prune stages, so no importance actor needs the model,
and its export is written in this process.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoTokenizer

from cluster.executor import LocalExecutor, make_executor
from cluster.stream_prune import stream_prune
from runner.config import JobConfig, ModelConfig, stage_names
from runner.errors import JobError
from runner.events import EventLog
from runner.models import check_safetensors, source_dir
from runner.run_state import DenseFacts, RunContext, RunState
from runner.setup_run import add_recovery_split, setup_calibration
from runner.stage_store import StageStore
from runner.tasks import get_task
from stages.arch import get_adapter
from stages.checkpoint import load_pruned
from stages.prune_stage import PruneStage
from stages.streaming.lazy_weights import LazyCheckpoint, meta_skeleton

SKIPPED = (
    "streamed run: the dense model is never loaded whole, so the SIA check and the dense model's "
    "own figures were not measured"
)


def start_streamed_run(cfg: JobConfig, model_cfg: ModelConfig, out: Path, log):
    """The run's context before anything is loaded: tokenizer, data, the source's size."""
    task = get_task(cfg.task)
    source = source_dir(model_cfg.ref)
    if source is None:
        raise JobError(
            f"calibration.streamed: {model_cfg.ref!r} is a built-in demo model; streaming reads a "
            "checkpoint folder (give its path)"
        )
    check_safetensors(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    data = task.build_data(cfg, model_cfg, None, tokenizer)
    add_recovery_split(cfg, data)
    lazy = LazyCheckpoint(source)
    meta_skeleton(lazy)  # config.json against the weights' shapes, before anything is written
    params = sum(math.prod(lazy.shape(n)) for n in lazy.names())
    info = {"name": model_cfg.ref, "architecture": (lazy.config.architectures or ["?"])[0],
            "attention": "?", "mlp": "?", "params": params}  # fmt: skip
    dense = DenseFacts(params, info, None, None, [SKIPPED], None)
    target = int(params / cfg.target.ratio) if cfg.target.ratio else None
    ctx = RunContext(
        cfg=cfg, model_cfg=model_cfg, task=task, out=out, log=log,
        events=EventLog(out / "events.jsonl"), store=StageStore(out / "stages"),
        tokenizer=tokenizer, data=data, calibration=setup_calibration(cfg, data),
        executor=LocalExecutor(None), dense=dense, params_target=target,
    )  # fmt: skip
    return ctx, RunState(model=None, adapter=None), source


def stream_prune_stages(ctx: RunContext, state: RunState, source: Path) -> int:
    """Run every prune stage streamed, save their records; returns the first stage left to run."""
    cfg, names = ctx.cfg, stage_names(ctx.cfg.stages)
    prune = [(i, s) for i, s in enumerate(cfg.stages) if isinstance(s, PruneStage)]
    stages = [s.model_copy(update={"name": names[i]}) for i, s in prune]
    last = prune[-1][0]
    model_dir = ctx.store.root / f".streamed-{last:02d}"
    executor = make_executor(cfg.cluster, None)
    try:
        plans = stream_prune(
            source, model_dir, stages, ctx.calibration, seed=cfg.seed, limits=ctx.limits,
            executor=executor, compute_dtype=torch.float32, log=ctx.log,
        )  # fmt: skip
    finally:
        executor.close()
    state.model = load_pruned(model_dir)
    state.adapter = get_adapter(state.model)
    metrics = ctx.task.stage_metrics(state.model, ctx.data).model_dump(exclude_unset=True)
    for (i, stage), plan in zip(prune, plans):
        state.version += 1
        if plan.granularity == "layers":
            dropped = set(plan.drop_layers)
            origin = state.layer_origin or list(range(len(plan.scores)))
            state.layer_origin = [o for k, o in enumerate(origin) if k not in dropped]
        record = {
            "index": i, "name": names[i], "kind": stage.kind, "version": state.version,
            "params_before": plan.params_before,
            "params_after": plan.params_before - plan.params_to_remove,
            "seconds": 0.0, "criterion": stage.criterion,
            "layer_origin": list(state.layer_origin), "streamed": True,
        } | (metrics if i == last else {"accuracy": None})  # fmt: skip
        ctx.events.emit("prune", stage=names[i], version=state.version, granularity=stage.kind,
                        removed_units=plan.removed_units(), streamed=True)  # fmt: skip
        moved = model_dir if i == last else None  # the streamed checkpoint, moved not copied
        ctx.store.save(i, names[i], None, ctx.tokenizer, record, {"plan": [plan]}, model_dir=moved)
        state.records.append(record)
    return last + 1
