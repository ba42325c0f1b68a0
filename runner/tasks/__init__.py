"""Tasks, one module each, registered by name (the job file's `task:` values come from here)."""

# Built-in tasks register themselves on import.
from runner.tasks import causal_lm, classification, embedding  # noqa: E402,F401,I001
from runner.tasks.base import (
    Task,
    TaskData,
    chance_level_warning,
    get_task,
    register_task,
    task_names,
)

__all__ = ["Task", "TaskData", "chance_level_warning", "get_task", "register_task", "task_names"]
