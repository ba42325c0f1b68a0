"""Per-stage directories: stages/NN_name/{plan.json, settings.json, metrics.json, model/}.

A stage directory is assembled under a temporary name and renamed into place, with metrics.json
written last inside it, so --resume can trust any NN_name directory that has a metrics.json.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from stages.atomic import atomic_directory, write_json_atomic
from stages.base import PrunePlan
from stages.checkpoint import DiskFullError, disk_full_error, save_checkpoint

_STAGE_DIR = re.compile(r"^(\d{2})_(.+)$")


class StageStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._model_dirs: dict[int, Path] = {}
        self.settings: dict | None = None  # runner.resume.stage_settings, kept in every stage

    def save(
        self, idx: int, name: str, model, tokenizer, record: dict, extra: dict, *, model_dir=None
    ) -> Path:
        """The stage directory, atomically; its model saved from memory, or `model_dir` (a
        checkpoint already written, e.g. by the streamed path) moved in, never copied."""
        final = self.root / f"{idx:02d}_{name}"
        try:
            with atomic_directory(final) as tmp:
                if "plan" in extra:
                    _write_plans(tmp, extra["plan"])
                if model_dir is not None:
                    os.replace(model_dir, tmp / "model")
                elif model is not None:
                    save_checkpoint(model, tokenizer, tmp / "model")
                if self.settings is not None:
                    write_json_atomic(tmp / "settings.json", self.settings)
                metrics = record | {k: v for k, v in extra.items() if k != "plan"}
                write_json_atomic(tmp / "metrics.json", metrics)
        except DiskFullError as exc:  # the half-written stage is gone; finished ones are kept
            error = disk_full_error(final, model, f"stage {name}'s model")
            raise DiskFullError(
                f"{error}; the stages finished before it are kept: rerun with --resume once "
                "there is room"
            ) from exc
        if model is not None or model_dir is not None:
            self._model_dirs[record["version"]] = final / "model"
        return final

    def model_dir_of(self, version: int) -> Path | None:
        return self._model_dirs.get(version)

    def completed(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        done = []
        for child in sorted(self.root.iterdir()):
            match = _STAGE_DIR.match(child.name)
            if match and (child / "metrics.json").is_file():
                done.append((int(match.group(1)), child))
        return done

    def last_complete(self):
        """(index, model_dir or None, records of all finished stages) of the last finished stage."""
        done = self.completed()
        if not done:
            return None
        records = [json.loads((d / "metrics.json").read_text()) for _, d in done]
        idx, last = done[-1]
        model_dir = last / "model" if (last / "model" / "manifest.json").is_file() else None
        if model_dir is not None:
            self._model_dirs[records[-1]["version"]] = model_dir
        return idx, model_dir, records

    def save_extra(self, name: str, data: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / f"{name}.json", data)

    def load_extra(self, name: str) -> dict | None:
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None


def _write_plans(directory: Path, plans: list[PrunePlan]) -> None:
    """plan.json (one plan, or {"steps": [...]} for a stage split in steps) and the refit
    tensors of compensated plans beside it (refit.safetensors, refit.step<k>.safetensors)."""
    body = [p.to_dict() for p in plans]
    write_json_atomic(directory / "plan.json", body[0] if len(body) == 1 else {"steps": body})
    for k, plan in enumerate(plans):
        if plan.refit is not None:
            name = PrunePlan.REFIT_FILE
            if len(plans) > 1:
                name = name.replace(".safetensors", f".step{k}.safetensors")
            plan.refit.save(directory / name)
