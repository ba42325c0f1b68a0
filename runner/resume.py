"""What --resume must restore or refuse so that a resumed run ends where a clean run would.

Settings: every stage directory keeps settings.json, the result-relevant config it was made with
(runner.config.result_settings, this model's entry only) and its fingerprint. Resume compares
each finished stage with the config now given and refuses a difference, naming the changed keys:
editing OUT/job.yaml and resuming from it used to mix a 1.4x heads plan with a 2.0x channels plan.

Teachers: a `kd` recover distils from a teacher computed from the model before the prune stage it
follows (`teacher: pre_stage`), or the dense model. A run resumed after that prune stage no longer
has the teacher in memory; it is rebuilt from the stored model of that version (or the dense
model), never from the model as it is now, which would change every later weight and plan.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from runner.config import JobConfig, ModelConfig, result_settings
from runner.errors import JobError
from runner.prune import next_recover, next_recover_needs_pre_stage_teacher
from runner.recovery import teacher_spec
from runner.run_state import RunContext, RunState
from stages.checkpoint import load_pruned
from stages.prune_stage import PruneStage

SETTINGS_FILE = "settings.json"


def stage_settings(cfg: JobConfig, model_cfg: ModelConfig) -> dict:
    """What a stage of `model_cfg` in job `cfg` was made with, and its fingerprint."""
    settings = result_settings(cfg) | {"models": [model_cfg.model_dump(mode="json")]}
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return {"fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16], "settings": settings}


def check_resumable(cfg: JobConfig, out: Path) -> None:
    """Refuse --resume when a finished stage was made with other settings, or cannot be read."""
    single = len(cfg.models) == 1
    for model_cfg in cfg.models:
        stages = (out if single else out / model_cfg.output_name) / "stages"
        if stages.is_dir():
            _check_stages(stages, stage_settings(cfg, model_cfg))


def _check_stages(stages: Path, current: dict) -> None:
    for stage_dir in sorted(p for p in stages.iterdir() if (p / "metrics.json").is_file()):
        _readable(stage_dir / "metrics.json")
        path = stage_dir / SETTINGS_FILE
        if not path.is_file():
            raise JobError(
                f"--resume: {stage_dir} has no {SETTINGS_FILE} (made by an older version, which "
                "did not record its settings), so resuming could mix settings; rerun with --force"
            )
        stored = _readable(path)
        if stored.get("fingerprint") != current["fingerprint"]:
            changed = _changes(stored.get("settings") or {}, current["settings"])
            raise JobError(
                f"--resume: stage {stage_dir.name} was made with other settings than this run's "
                f"({changed}); resuming would mix two configs: rerun with --force, or resume "
                "with the config the stages were made with"
            )


def _readable(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise JobError(
            f"--resume: {path} is unreadable ({reason}: truncated or damaged?); delete its stage "
            "directory and every later one to redo them, or rerun with --force"
        ) from None
    if not isinstance(data, dict):
        raise JobError(f"--resume: {path} is not a JSON object; rerun with --force")
    return data


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in items:
        flat |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _changes(old: dict, new: dict, limit: int = 3) -> str:
    """'target.ratio 1.4 -> 2.0, ...' for the keys whose values differ."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    if not keys:
        return "settings differ"
    shown = [f"{k} {_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))}" for k in keys]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown[:limit]) + more


def teachers_to_restore(stages: list, first: int, streamed: bool) -> dict[str, int]:
    """{teacher key: q} for the teachers a clean run holds when stage `first` starts and a kd
    recover at or after `first` reads; each was computed from the input model of stage q.

    Mirrors the clean run: a prune stage whose next recover distils from `pre_stage` caches the
    teacher of the model before it (not on the streamed path, which never runs `prune`); a kd
    recover whose teacher is missing caches the model as it is then under "dense"
    (runner.recovery._teacher), and setup caches the dense model's when a stage asks for it.
    """
    held = {"dense": 0} if not streamed and any(_kd(s, "dense") for s in stages) else {}
    needed: dict[str, int] = {}
    for i, stage in enumerate(stages):
        if isinstance(stage, PruneStage):
            if not streamed and next_recover_needs_pre_stage_teacher(stages, i):
                held["pre_stage"] = i
        elif stage.loss == "kd":
            key = stage.teacher if stage.teacher in held else "dense"
            held.setdefault(key, i)
            if i >= first and held[key] < first:
                needed[key] = held[key]
    return needed


def _kd(stage, teacher: str) -> bool:
    return getattr(stage, "loss", None) == "kd" and getattr(stage, "teacher", None) == teacher


def restore_teachers(ctx: RunContext, state: RunState, first: int, dense_model) -> None:
    """Rebuild the teachers a resumed run needs from the stored versions they were made from
    (`dense_model`: the dense model as set up, before the resumed version replaced it)."""
    streamed = ctx.cfg.calibration.streamed
    stored = dict(ctx.store.completed())
    names = [d.name for _, d in sorted(stored.items())]
    for key, q in teachers_to_restore(ctx.cfg.stages, first, streamed).items():
        if key == "dense" and q == 0 and key in state.teachers:
            continue  # setup computed it from the dense model, as the clean run did
        if q == 0:
            model = dense_model
        else:
            model_dir = stored.get(q - 1, Path("?")) / "model"
            model = (
                load_pruned(model_dir, attn_implementation=_attn(state))
                if (model_dir / "manifest.json").is_file()
                else None
            )
        if model is None:
            raise JobError(
                f"cannot --resume: a kd recover after stage {names[-1] if names else '?'} "
                f"distils from the model that entered stage {q}, which was not kept; rerun "
                "with --force"
            )
        spec = _teacher_spec(ctx.cfg.stages, key, q)
        state.teachers[key] = ctx.task.objective.make_teacher(
            model, ctx.data.splits["recovery"], spec
        )
        ctx.log(f"resume: {key} teacher rebuilt from the model that entered stage {q}")


def _teacher_spec(stages: list, key: str, q: int):
    """What the clean run cached for teacher `key` made from the model entering stage q: set-up's
    dense teacher, a prune stage's pre_stage one for its next recover, or the stand-in
    (runner.recovery._teacher) every kd stage may read."""
    if key == "pre_stage":
        return teacher_spec([next_recover(stages, q)])
    return teacher_spec(stages, "dense") if q == 0 else teacher_spec(stages)


def _attn(state: RunState):
    return state.model.config._attn_implementation if state.model is not None else None
