"""The dense model is measured once per comparison: same weights, data and settings, same key."""

import copy

import pytest
import torch
from conftest import TINY_DATA

from runner.compare import CompareConfig, run_compare
from runner.dense_cache import fingerprint, measure_dense, reuse_dense_measures
from runner.tasks import TaskData, get_task
from stages.split import EncodedSplit


def _data() -> TaskData:
    ids = torch.arange(12).reshape(3, 4)
    split = EncodedSplit(ids, torch.ones_like(ids), torch.tensor([0, 1, 0]))
    return TaskData(splits={"test": split}, extras={"prompts": ["a", "b"], "limit": 4})


SETTINGS = ("causal_lm", '{"ref": "m"}', "{}")


def test_fingerprint_follows_weights_data_and_settings():
    model = torch.nn.Linear(3, 2)
    data = _data()
    key = fingerprint(model, data, SETTINGS)
    assert fingerprint(copy.deepcopy(model), copy.deepcopy(data), SETTINGS) == key

    changed_weight = copy.deepcopy(model)
    with torch.no_grad():
        changed_weight.weight[0, 0] += 1e-6
    changed_token = _data()
    changed_token.splits["test"].input_ids[2, 3] = 99
    changed_extra = _data()
    changed_extra.extras["prompts"][1] = "c"
    other_recovery = _data()  # recover stages' subset of train: sized by each method's budget
    other_recovery.splits["recovery"] = other_recovery.splits["test"].subset([0])
    assert fingerprint(model, other_recovery, SETTINGS) == key
    keys = {
        fingerprint(changed_weight, data, SETTINGS),
        fingerprint(model, changed_token, SETTINGS),
        fingerprint(model, changed_extra, SETTINGS),
        fingerprint(model, data, (*SETTINGS[:2], '{"test_blocks": 3}')),
    }
    assert key not in keys and len(keys) == 4


def test_measures_are_reused_only_inside_the_block_and_as_copies():
    model, data, calls = torch.nn.Linear(3, 2), _data(), []

    def measure():
        calls.append(1)
        return {"test": [1.0, 2.0]}

    for _ in range(2):
        assert measure_dense(measure, model=model, data=data, settings=SETTINGS)[1] is False
    assert len(calls) == 2  # no block: every job measures
    with reuse_dense_measures():
        first, reused_first = measure_dense(measure, model=model, data=data, settings=SETTINGS)
        first["test"].append(3.0)  # a job changing its copy must not change the next job's
        second, reused_second = measure_dense(measure, model=model, data=data, settings=SETTINGS)
        other, _ = measure_dense(measure, model=torch.nn.Linear(3, 2), data=data, settings=SETTINGS)
    assert (reused_first, reused_second) == (False, True)
    assert second == {"test": [1.0, 2.0]} and other == second
    assert len(calls) == 4  # measured once for the first model, once for the other


@pytest.mark.slow
def test_compare_measures_the_dense_model_once(tmp_path, monkeypatch):
    task = type(get_task("classification"))
    real_measure, calls = task.measure, []

    def counting(self, model, data):
        calls.append(1)
        return real_measure(self, model, data)

    monkeypatch.setattr(task, "measure", counting)
    cfg = CompareConfig(  # flap trains nothing; l2_mlp_ce's recovery split is its own size
        methods=["flap", "l2_mlp_ce"],
        ratios=[1.5],
        recovery_steps=2,
        job={
            "models": ["demo-tiny-gpt2"],
            "data": dict(TINY_DATA),
            "sia": {"enabled": False},
            "output": {"save_stage_models": False, "plots": False, "progress": False},
        },
    )
    result = run_compare(cfg, tmp_path / "cmp", log=lambda m: None)
    rows = result["rows"]
    assert [r.get("error") for r in rows] == [None, None]
    assert len(calls) == 3  # the dense model once, each method's pruned model once
    assert rows[0]["dense_accuracy"] == rows[1]["dense_accuracy"]
