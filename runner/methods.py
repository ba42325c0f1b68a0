"""Method presets (configs/methods/*.yaml): the stage list of a method, merged into a base job.

Used by `cascade compare` so every method runs with the same model, data, calibration set and
the same recovery budget: a total of steps (each preset's recover steps are rescaled to it) or of
tokens (the job's `recovery.tokens`, split over the recover stages by `recovery.schedule`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from runner.config import ConfigError, JobConfig, Strict, parse_config
from runner.config_files import read_yaml_file

METHODS_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"


class MethodPreset(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    data: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the job's data section"
    )
    stages: list[dict[str, Any]] = Field(min_length=1)


def available_methods() -> list[str]:
    return sorted(p.stem for p in METHODS_DIR.glob("*.yaml"))


def load_method(name_or_path: str) -> MethodPreset:
    path = Path(name_or_path)
    if not path.suffix:
        path = METHODS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            [
                (
                    "methods",
                    f"unknown method {name_or_path!r}; available: {', '.join(available_methods())}",
                )
            ]
        )
    try:
        return MethodPreset.model_validate(read_yaml_file(path))
    except ValidationError as exc:
        raise ConfigError(
            [(".".join(map(str, e["loc"])), e["msg"]) for e in exc.errors()], str(path)
        ) from None


def compose(
    base_raw: dict,
    preset: MethodPreset,
    *,
    ratio: float | None = None,
    recovery_steps: int | None = None,
    recovery: dict | None = None,
    recovery_tokens: int | None = None,
    recovery_schedule: str | None = None,
) -> JobConfig:
    """A full job: base job's models/data/... with the preset's stages, target ratio and step
    or token budget; `recovery` fills every recover stage's settings that the preset leaves unset.

    recovery_tokens (with recovery_schedule) becomes the job's `recovery.tokens`: every method
    trains on the same number of tokens whatever its batch size or block length. A preset that
    trains nothing gets no token budget."""
    raw = copy.deepcopy(base_raw)
    raw["name"] = f"{raw.get('name', 'job')}-{preset.name}" + (f"-{ratio:g}x" if ratio else "")
    raw["stages"] = copy.deepcopy(preset.stages)
    raw["data"] = {**raw.get("data", {}), **preset.data}
    if ratio is not None:
        raw.setdefault("target", {})["ratio"] = ratio
    if recovery_steps is not None:
        _rescale_steps(raw["stages"], recovery_steps)
    budget = dict(raw.get("recovery") or {})
    if recovery_tokens is not None:
        budget["tokens"] = recovery_tokens
    if recovery_schedule is not None:
        budget["schedule"] = recovery_schedule
    if not any(s.get("kind") == "recover" for s in raw["stages"]):
        budget = {k: v for k, v in budget.items() if k not in ("tokens", "schedule")}
    if budget:
        raw["recovery"] = budget
    for stage in raw["stages"]:
        if stage.get("kind") == "recover":
            stage.update({k: v for k, v in (recovery or {}).items() if k not in stage})
    return parse_config(raw, f"method {preset.name}")


def _rescale_steps(stages: list[dict], total: int) -> None:
    recover = [s for s in stages if s.get("kind") == "recover"]
    current = sum(s.get("steps", 100) for s in recover)
    if not recover or current == 0:
        return
    assigned = 0
    for i, s in enumerate(recover):
        steps = (
            total - assigned
            if i == len(recover) - 1
            else round(total * s.get("steps", 100) / current)
        )
        s["steps"] = steps
        assigned += steps
