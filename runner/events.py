"""events.jsonl: one JSON object per line, appended and fsynced so a crash loses nothing written
(NaN/Infinity written as null, with a warning: every line is RFC 8259 JSON)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from stages.atomic import dumps_finite


class EventLog:
    def __init__(self, path: str | Path, echo=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._echo = echo

    def emit(
        self, event: str, *, stage: str | None = None, version: int | None = None, **fields
    ) -> dict:
        record = {"ts": time.time(), "event": event, "stage": stage, "version": version, **fields}
        line = dumps_finite(record, str(self.path), default=_jsonable)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._echo is not None:
            self._echo(record)
        return record

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
