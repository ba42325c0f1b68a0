"""RIA: hand-made numbers, and one file is all it took (job file, in memory, Ray, streamed).

stages/criteria/ria.py was added without touching any other file; these tests show the job
schema accepts it, and that in-memory, two Ray workers and the layer-streamed path (two row
shards) give the same scores and plans.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import padded_batch, tiny_llama

from cluster.executor import LocalExecutor
from cluster.stream_prune import stream_scores
from runner.config import parse_config
from stages.arch import get_adapter
from stages.budget import Budget
from stages.criteria.ria import relative_importance
from stages.estimate import EstimateRequest, estimate_locally, scores_from_statistics
from stages.units import plan_unit_removal


def test_relative_importance_by_hand():
    w = torch.tensor([[1.0, -3.0], [2.0, 0.0]])  # [out 2, in 2], one column per unit
    x_sq_sum = torch.tensor([16.0, 64.0])  # 4 tokens: RMS 2 and 4
    # row sums |W|: 4, 2; column sums: 3, 3
    ri = torch.tensor([[1 / 4 + 1 / 3, 3 / 4 + 3 / 3], [2 / 2 + 2 / 3, 0.0]])
    expected = (ri * torch.tensor([2.0, 4.0]).sqrt()).sum(0).double()
    torch.testing.assert_close(relative_importance(w, x_sq_sum, 4, 1), expected)
    # two columns per unit: the unit's columns add up
    torch.testing.assert_close(relative_importance(w, x_sq_sum, 4, 2), expected.sum().reshape(1))


def test_the_job_file_accepts_the_registered_name():
    raw = {
        "models": ["demo-tiny-llama"],
        "stages": [{"kind": "channels", "criterion": "ria", "ratio": 0.25}],
    }
    assert parse_config(raw).stages[0].criterion == "ria"


def calibration(n: int = 5) -> list[dict]:
    batches = []
    for seed in range(n):
        ids, mask = padded_batch(batch=3, seq_len=9, seed=seed)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return batches


def plan(model, adapter, granularity, scores):
    return plan_unit_removal(
        model, adapter, granularity, scores, Budget(units=3),
        stage="s", criterion="ria", version_in=0, params_before=0,
    )  # fmt: skip


@pytest.mark.parametrize("granularity", ["heads", "channels"])
def test_streamed_two_shards_equal_in_memory(granularity, tmp_path):
    model = tiny_llama(attn_implementation="sdpa")
    adapter = get_adapter(model)
    model.save_pretrained(tmp_path / "src")
    request = EstimateRequest(granularity, "ria")
    want, _ = estimate_locally(model, adapter, calibration(), request)
    got, _ = stream_scores(
        tmp_path / "src", calibration(), request,
        executor=LocalExecutor(None, layer_workers=2), attn_implementation="sdpa",
    )  # fmt: skip
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert (
        plan(model, adapter, granularity, got).keep == plan(model, adapter, granularity, want).keep
    )


@pytest.mark.slow
@pytest.mark.ray
def test_two_ray_workers_equal_in_memory(shared_ray):
    from cluster.ray_executor import RayExecutor
    from runner.config import ClusterConfig

    model = tiny_llama()
    adapter = get_adapter(model)
    request = EstimateRequest("channels", "ria", "causal_lm")
    want, _ = estimate_locally(model, adapter, calibration(), request)
    executor = RayExecutor(ClusterConfig(executor="ray", workers=2, cpus_per_worker=0.5), None)
    try:
        executor.set_calibration(calibration())
        executor.load_version(0, model, None)
        executor.barrier(0)
        got = scores_from_statistics(model, adapter, executor.estimate(request, 0), request)
    finally:
        executor.close()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=0)
    assert plan(model, adapter, "channels", got).keep == plan(model, adapter, "channels", want).keep
