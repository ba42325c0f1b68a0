"""Choice tasks as lm-evaluation-harness task files over local data (no hub, no downloads).

Each task is two files in one folder: NAME.jsonl (one item a line: {"context", "choices",
"label"}, the items runner.data.choice_tasks builds) and NAME.yaml, an lm-eval `multiple_choice`
task reading that file through the `json` dataset builder:

    task: cascade_bearing_qa
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/bearing_qa.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: context      # a field name: the text as is (a Jinja template would eat a
    doc_to_choice: choices    # trailing newline)
    doc_to_target: label
    metric_list: [acc, acc_norm]

lm-eval then asks for log p(" " + choice | context) of every choice, exactly the requests
stages.choice_eval scores; `lm_eval --include_path FOLDER --tasks cascade_bearing_qa` runs the
same files outside cascade. Task names get the `cascade_` prefix so they never shadow one of
lm-eval's own tasks when its defaults are included.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from runner.data.choice_tasks import ChoiceExample

TASK_PREFIX = "cascade_"
METRICS = ("acc", "acc_norm")


def lm_eval_name(name: str) -> str:
    return f"{TASK_PREFIX}{name}"


def task_config(name: str, data_file: Path) -> dict:
    """The lm-eval YAML of one task over a local JSONL file (absolute path: lm-eval opens it
    from wherever it runs)."""
    return {
        "task": lm_eval_name(name),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS
        ],
        "metadata": {"version": 1.0, "source": "cascade-runner"},
    }


def write_task(name: str, examples: Sequence[ChoiceExample], folder: Path) -> str:
    """FOLDER/NAME.jsonl + FOLDER/NAME.yaml; returns the lm-eval task name."""
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / f"{name}.jsonl"
    with open(data_file, "w", encoding="utf-8") as handle:
        for example in examples:
            row = {"context": example.context, "choices": list(example.choices)}
            handle.write(json.dumps(row | {"label": example.label}, ensure_ascii=False) + "\n")
    config = task_config(name, data_file)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return config["task"]
