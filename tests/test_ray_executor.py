"""RayExecutor equals LocalExecutor, refuses stale versions, waits at barriers, survives a crash
and says so (events, warnings).

The session's shared Ray (conftest `module_ray`) and two executors (1 and 2 workers, half a CPU
each) for the whole module: actor start-up costs seconds, so the module is marked slow.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch

from cluster.executor import LocalExecutor, StaleVersionError
from cluster.ray_executor import BarrierTimeoutError, RayExecutor
from cluster.workers import WorkerCore, WorkerNotLoadedError
from runner.config import ClusterConfig
from stages.arch import get_adapter
from stages.budget import Budget
from stages.checkpoint import save_checkpoint
from stages.estimate import EstimateRequest, scores_from_statistics
from stages.layers import plan_layer_removal
from stages.units import plan_unit_removal
from tests.tiny_models import NUM_LABELS, padded_batch, tiny_gpt2, tiny_llama

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REQUESTS = [
    EstimateRequest("heads", "wanda"),
    EstimateRequest("channels", "taylor"),
    EstimateRequest("layers", "block_influence"),
]


def calibration(n_batches: int = 5) -> list[dict]:
    """Uneven micro-batch count (5) so the two shards differ in size."""
    batches = []
    for seed in range(n_batches):
        ids, mask = padded_batch(batch=3, seq_len=9, seed=seed)
        labels = torch.arange(3) % NUM_LABELS
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def ray_executor(workers: int) -> RayExecutor:
    """Half a CPU per worker: the 1- and 2-worker executors (3 actors) fit side by side."""
    cfg = ClusterConfig(executor="ray", workers=workers, cpus_per_worker=0.5)
    return RayExecutor(cfg, None)


@pytest.fixture(scope="module")
def two_workers(module_ray):
    executor = ray_executor(2)
    yield executor
    executor.close()


@pytest.fixture(scope="module")
def one_worker(module_ray):
    executor = ray_executor(1)
    yield executor
    executor.close()


def plan_for(model, adapter, request: EstimateRequest, stats) -> tuple:
    scores = scores_from_statistics(model, adapter, stats, request)
    common = dict(stage="s", criterion=request.criterion, version_in=0, params_before=0)
    if request.granularity == "layers":
        plan = plan_layer_removal(model, adapter, scores, Budget(units=1), **common)
    else:
        plan = plan_unit_removal(
            model, adapter, request.granularity, scores, Budget(units=3), **common
        )
    return scores, plan


def assert_stats_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-9, msg=key)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_one_and_two_workers_match_local(build, one_worker, two_workers):
    model = build()
    adapter = get_adapter(model)
    batches = calibration()
    local = LocalExecutor(adapter)
    local.set_calibration(batches)
    local.load_version(0, model, None)
    expected = {r: local.estimate(r, 0) for r in REQUESTS}
    for executor in (one_worker, two_workers):
        executor.set_calibration(batches)
        executor.load_version(0, model, None)
        states = executor.barrier(0)
        workers = executor.workers
        assert [(s.worker, s.version) for s in states] == [
            (f"worker-{i}", 0) for i in range(workers)
        ]
        for request in REQUESTS:
            got = executor.estimate(request, 0)
            assert_stats_close(got, expected[request])
            assert float(got["rows"]) == 15.0  # every micro-batch counted exactly once
            got_scores, got_plan = plan_for(model, adapter, request, got)
            want_scores, want_plan = plan_for(model, adapter, request, expected[request])
            for g, w in zip(got_scores, want_scores):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-9)
            assert got_plan.drop_layers == want_plan.drop_layers
            assert got_plan.keep == want_plan.keep


def test_stale_version_refused_and_barrier_waits_for_slow_worker(two_workers, tmp_path):
    executor = two_workers
    model = tiny_gpt2()
    pruned = tiny_gpt2(seed=1)  # "version 11": different weights, so stale stats would differ
    request = EstimateRequest("heads", "wanda")
    batches = calibration()
    local = LocalExecutor(get_adapter(pruned))
    local.set_calibration(batches)
    local.load_version(11, pruned, None)
    expected = local.estimate(request, 11)
    executor.set_calibration(batches)
    executor.load_version(10, model, None)
    executor.barrier(10)
    # the driver asks for a version the workers do not hold: a worker (whichever answers first) refuses
    with pytest.raises(
        StaleVersionError, match=r"worker-[01] holds version 10, asked for version 11"
    ):
        executor.estimate(request, 11)
    # slow reload on worker-1: a short barrier times out naming it, a longer one waits
    ray.get(executor.actors[1].set_test_delays.remote(load_s=2.0))
    # version 11 comes from a checkpoint directory (shared storage), not the object store
    checkpoint = save_checkpoint(pruned, None, tmp_path / "v11")
    executor.load_version(11, pruned, str(checkpoint))
    try:
        executor.barrier_timeout_s = 0.5
        with pytest.raises(BarrierTimeoutError, match="worker-1"):
            executor.barrier(11)
        executor.barrier_timeout_s = 60.0
        start = time.monotonic()
        states = executor.barrier(11)
        assert time.monotonic() - start > 0.5  # it really waited for the remaining load time
    finally:
        ray.get(executor.actors[1].set_test_delays.remote(load_s=0.0))
    assert [s.version for s in states] == [11, 11]
    assert ray.get([a.version.remote() for a in executor.actors]) == [11, 11]
    assert_stats_close(executor.estimate(request, 11), expected)
    with pytest.raises(StaleVersionError, match="driver loaded version 11"):
        executor.barrier(10)


def test_killed_worker_is_recorded_rerun_elsewhere_and_restarted(two_workers):
    """kill -9 of an actor mid-estimate: its shard re-runs on the other worker (same sums), the
    loss, the re-run and the restart are reported as events and warnings, and the restarted
    actor gets the current version back."""
    executor = two_workers
    events: list[tuple[str, dict]] = []
    executor.on_event = lambda event, **fields: events.append((event, fields))
    warnings_before = len(executor.warnings)
    model = tiny_llama()
    request = EstimateRequest("channels", "taylor")
    executor.set_calibration(calibration())
    executor.load_version(20, model, None)
    executor.barrier(20)
    undisturbed = executor.estimate(request, 20)
    victim = executor.actors[1]
    pid = ray.get(victim.pid.remote())
    ray.get(victim.set_test_delays.remote(estimate_s=5.0))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(executor.estimate(request, 20)))
    thread.start()
    time.sleep(1.5)  # the victim is now sleeping inside estimate
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=90)
    assert not thread.is_alive(), "estimate did not return after the worker was killed"
    assert_stats_close(result, undisturbed)
    deadline = time.monotonic() + 90
    while len(states := executor.barrier(20)) < 2:  # Ray restarts the actor: it rejoins
        assert time.monotonic() < deadline, "the killed worker never came back"
        time.sleep(0.5)
    assert [s.version for s in states] == [20, 20]
    assert ray.get(victim.pid.remote()) != pid  # a new process
    assert ray.get(victim.version.remote()) == 20  # holding the version the driver re-sent
    events = [(e, f) for e, f in events if e != "worker_start"]  # first use of a fresh executor
    assert [e for e, _ in events] == ["worker_lost", "task_rerun", "worker_restart"], events
    lost, rerun, back = (fields for _, fields in events)
    assert lost["worker"] == "worker-1" and lost["pid"] == pid and lost["version"] == 20
    assert "estimate channels/taylor on shard 1" in lost["task"] and lost["node"]
    assert 1.0 < lost["seconds"] < 30
    assert rerun["worker"] == "worker-0" and rerun["task"] == lost["task"]
    assert rerun["lost_with"] == "worker-1" and rerun["seconds"] > 0
    assert back["worker"] == "worker-1" and back["pid"] not in (None, pid)
    assert back["task"] == lost["task"] and back["seconds"] > 0 and back["version"] == 20
    new_warnings = executor.warnings[warnings_before:]
    assert len(new_warnings) == 3 and "worker-1" in new_warnings[0]
    assert f"pid {pid}" in new_warnings[0] and "re-ran on worker-0" in new_warnings[1]
    executor.on_event = None


def test_worker_core_refuses_without_ray():
    """The actor logic itself (no Ray): not loaded, stale, then correct."""
    model = tiny_gpt2()
    request = EstimateRequest("heads", "wanda")
    core = WorkerCore("worker-7")
    core.set_calibration(calibration(2))
    with pytest.raises(WorkerNotLoadedError, match="worker-7 holds no model"):
        core.estimate(request, 0, [0, 1])
    assert core.load(3, None, model) == 3 and core.version() == 3
    with pytest.raises(StaleVersionError, match="worker-7 holds version 3, asked for version 4"):
        core.estimate(request, 4, [0])
    stats = core.estimate(request, 3, [1])
    assert float(stats["rows"]) == 3.0
