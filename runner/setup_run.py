"""Everything a model's cascade needs before the first stage, one small `_setup_*` per component."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from cluster.executor import Executor, make_executor
from runner.config import JobConfig, ModelConfig, RecoverStageConfig
from runner.dense_cache import measure_dense
from runner.errors import JobError
from runner.events import EventLog
from runner.lm_head import PerplexityProbe
from runner.models import describe_model, load_model, source_dir
from runner.preflight import preflight
from runner.progress import still_working
from runner.recovery import teacher_spec, use_self_data
from runner.recovery_budget import max_rows
from runner.run_state import DenseFacts, RunContext, RunState
from runner.stage_store import StageStore
from runner.tasks import Task, TaskData, get_task
from runner.validate import params_for_budget
from stages.arch import get_adapter
from stages.base import param_count


def start_run(
    cfg: JobConfig, model_cfg: ModelConfig, out: Path, log
) -> tuple[RunContext, RunState]:
    """Load and measure the dense model, build the data and the executor: the run's start."""
    task = get_task(cfg.task)
    model, tokenizer = setup_model(cfg, model_cfg, task)
    adapter = get_adapter(model)
    data = task.build_data(cfg, model_cfg, model, tokenizer)
    add_recovery_split(cfg, data)
    use_self_data(cfg, model, data, tokenizer, log)
    calibration = setup_calibration(cfg, data)
    executor = _setup_executor(cfg, adapter, calibration)
    try:
        finetune = task.prepare_dense(cfg, model_cfg, model, data, log)
        perplexity = _setup_perplexity(cfg, model_cfg, tokenizer, model)
        dense = _setup_dense(cfg, task, model, model_cfg, data, finetune, perplexity, log)
        params_target = _setup_params_target(cfg, model, dense.params)
        preflight(cfg, model_cfg.ref, model, adapter, dense.params, params_target)
    except BaseException:
        executor.close()
        raise
    ctx = RunContext(
        cfg=cfg, model_cfg=model_cfg, task=task, out=out, log=log,
        events=EventLog(out / "events.jsonl"), store=StageStore(out / "stages"),
        tokenizer=tokenizer, data=data, calibration=calibration, executor=executor,
        dense=dense, params_target=params_target, perplexity=perplexity,
    )  # fmt: skip
    executor.on_event = ctx.events.emit  # worker losses / restarts go to events.jsonl
    state = RunState(
        model=model, adapter=adapter, layer_origin=list(range(len(adapter.layers(model))))
    )
    if _needs_dense_teacher(cfg):
        spec = teacher_spec(cfg.stages, "dense")
        state.teachers["dense"] = task.objective.make_teacher(model, data.splits["recovery"], spec)
    return ctx, state


def setup_model(cfg: JobConfig, model_cfg: ModelConfig, task: Task):
    return load_model(
        model_cfg.ref,
        head=task.head,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=getattr(torch, model_cfg.dtype),
        progress=cfg.output.progress,
        data_cfg=cfg.data,
        seed=cfg.seed,
        **task.load_kwargs(cfg),
    )


def add_recovery_split(cfg: JobConfig, data: TaskData) -> None:
    """data.splits["recovery"]: the training rows recovery can reach, once per job.

    A recovery reads at most steps x batch_size rows; when the train split is larger (real text:
    thousands of blocks) a seeded random subset of that many rows, kept in split order, is what
    every recover stage trains on and what KD teachers are computed for: a teacher pass over a
    whole corpus would cost more than the training itself.
    """
    train = data.splits["train"]
    reach = max_rows(cfg, train.input_ids.shape[1])
    if reach >= len(train) or reach == 0:
        data.splits["recovery"] = train
        return
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    data.splits["recovery"] = train.subset(order[:reach].sort().values)


def setup_calibration(cfg: JobConfig, data: TaskData) -> list[dict]:
    split = data.splits["calibration"]
    if len(split) < cfg.calibration.min_samples:
        raise JobError(
            f"calibration set has {len(split)} rows, fewer than calibration.min_samples="
            f"{cfg.calibration.min_samples} (data.calibration_size)"
        )
    return list(split.batches(cfg.calibration.batch_size))


def _setup_executor(cfg: JobConfig, adapter, calibration: list[dict]) -> Executor:
    executor = make_executor(cfg.cluster, adapter)
    executor.set_calibration(calibration)
    return executor


def _setup_perplexity(cfg: JobConfig, model_cfg: ModelConfig, tokenizer, model):
    if cfg.evaluation.perplexity_file is None:
        return None
    source = source_dir(model_cfg.ref)
    if source is None:
        raise JobError(
            f"evaluation.perplexity_file: demo model {model_cfg.ref!r} is a classifier "
            "trained from scratch and has no language-model head; use a causal-LM checkpoint"
        )
    return PerplexityProbe(cfg.evaluation, source, model_cfg.ref, tokenizer, model)


def _setup_dense(
    cfg: JobConfig, task: Task, model, model_cfg, data, finetune, perplexity, log
) -> DenseFacts:
    settings = (task.name, model_cfg.model_dump_json(), cfg.evaluation.model_dump_json())
    with still_working(f"{model_cfg.ref}: measuring the dense model", log):
        measures, reused = measure_dense(
            lambda: task.measure(model, data), model=model, data=data, settings=settings
        )
    if reused:
        log(f"{model_cfg.ref}: same dense model and data as an earlier job here: measures reused")
    warnings = task.dense_warnings(measures)
    for warning in warnings:
        log(f"WARNING: {warning}")
    return DenseFacts(
        params=param_count(model),
        info=describe_model(model) | {"name": model_cfg.ref},
        measures=measures,
        finetune=finetune,
        warnings=warnings,
        perplexity=perplexity.measure(model) if perplexity else None,
        layout=[asdict(x) for x in get_adapter(model).layout(model)],
    )


def _setup_params_target(cfg: JobConfig, model, dense_params: int) -> int | None:
    target = cfg.target
    if target.ratio is not None:
        return int(dense_params / target.ratio)
    if target.device is not None or target.budget_bytes is not None:
        return params_for_budget(model, target, cfg)
    return None


def _needs_dense_teacher(cfg: JobConfig) -> bool:
    return any(
        isinstance(s, RecoverStageConfig) and s.loss == "kd" and s.teacher == "dense"
        for s in cfg.stages
    )
