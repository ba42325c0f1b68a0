"""A recover stage: LoRA / full / mask tuning in-process or under Ray Train, then the barrier."""

from __future__ import annotations

from runner.config import JobConfig, RecoverStageConfig, StageConfig
from runner.progress import step_bar, still_working
from runner.recovery_budget import planned_steps
from runner.run_state import RunContext, RunState
from runner.workers import sync_workers
from stages.guards import check_finite
from stages.objectives import TeacherSpec
from stages.recover import RecoverySettings, recover
from stages.self_data import self_generated


def recover_stage(ctx: RunContext, state: RunState, idx: int, stage: RecoverStageConfig, name: str):
    """Train, merge, check, bump the version, sync workers; returns (params before, metrics)."""
    before = state.snapshot()
    train = ctx.data.splits["recovery"]
    steps = stage_steps(ctx, state, before["params"])
    stage = stage.model_copy(update={"steps": steps})
    teacher = _teacher(ctx, state, stage)
    settings = RecoverySettings.from_stage(stage, seed=ctx.cfg.seed + idx)
    ctx.events.emit(
        "recover_start",
        stage=name,
        version=state.version,
        steps=steps,
        tokens=steps * stage.batch_size * train.input_ids.shape[1],
        method=stage.method,
        runner=stage.runner,
    )
    objective = ctx.task.objective
    if stage.runner == "ray_train":
        # lazy: Ray Train (and Ray) load only for jobs that ask for them (start-up cost)
        from cluster.train import recover_distributed

        state.model, metrics = recover_distributed(
            state.model, state.adapter, train, settings, objective.name, teacher,
            ctx.cfg.cluster, stage.strategy,
        )  # fmt: skip
    else:
        label = f"{ctx.model_cfg.ref} {name}"
        with step_bar(settings.steps, label, ctx.cfg.output.progress, log=ctx.log) as on_step:
            state.model, metrics = recover(
                state.model, state.adapter, train, settings, objective, teacher, on_step
            )
    check_finite(state.model, ctx.calibration[0])
    state.version += 1
    ctx.events.emit(
        "recover_end",
        stage=name,
        version=state.version,
        first_loss=metrics.get("first_loss"),
        last_loss=metrics.get("last_loss"),
    )
    sync_workers(ctx, state, name)
    kept = {k: v for k, v in metrics.items() if k != "losses"}
    return before, kept | {"losses": metrics["losses"][::10]}


def stage_steps(ctx: RunContext, state: RunState, params_now: int) -> int:
    """This recover stage's steps: its own, or its share of `recovery.tokens` (recovery_budget)."""
    seen = [r["params_before"] for r in state.records if r["kind"] == "recover"] + [params_now]
    block = ctx.data.splits["recovery"].input_ids.shape[1]
    plan = planned_steps(ctx.cfg, block, seen, ctx.dense.params, ctx.params_target)
    return plan[-1]


def _teacher(ctx: RunContext, state: RunState, stage: RecoverStageConfig):
    if stage.loss != "kd":
        return None
    teacher = state.teachers.get(stage.teacher)
    if teacher is None:  # resumed past the stage that cached it: the model as it is now stands in
        teacher = state.teachers.setdefault(
            "dense",
            ctx.task.objective.make_teacher(
                state.model, ctx.data.splits["recovery"], teacher_spec(ctx.cfg.stages)
            ),
        )
    return teacher


def teacher_spec(stages: list[StageConfig], teacher: str | None = None) -> TeacherSpec:
    """What one cached teacher must hold for the kd recover stages among `stages` that read it
    (`teacher` None: all of them): the largest top k, every temperature."""
    readers = [
        s
        for s in stages
        if isinstance(s, RecoverStageConfig)
        and s.loss == "kd"
        and (teacher is None or s.teacher == teacher)
    ]
    if not readers:
        return TeacherSpec()
    sizes = [s.kd_top_k for s in readers]
    return TeacherSpec(
        top_k=None if None in sizes else max(sizes),
        temperatures=tuple(sorted({float(s.kd_temperature) for s in readers})),
    )


def use_self_data(cfg: JobConfig, model, data, tokenizer, log) -> None:
    """recovery.data: self: the recovery blocks rewritten by the dense model (stages.self_data)."""
    if cfg.recovery.data != "self":
        return
    pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    split = data.splits["recovery"]
    with still_working(f"writing {len(split)} recovery blocks with the dense model", log):
        data.splits["recovery"] = self_generated(
            model, split, prompt_tokens=cfg.recovery.prompt_tokens,
            temperature=cfg.recovery.sample_temperature, seed=cfg.seed, pad_id=pad,
        )  # fmt: skip
