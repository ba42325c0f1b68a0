"""A job on a simulated two-node Ray cluster, and a node removed in the middle of an importance stage.

`ray.cluster_utils.Cluster` runs two nodes of one CPU each on this machine, every process bound to
127.0.0.1: the head (which also hosts the driver) and a worker node. Each importance worker needs
one CPU, so the two workers must sit on different nodes. While the heads stage estimates, the
worker node is removed (its raylet and processes killed): the lost shard re-runs on the worker
left on the head, the job finishes with exactly the plans of an in-process run, and events.jsonl
and the report's warnings say which worker was lost on which node, doing what, and where its task
re-ran. ~60 s on a busy 2-core box (cluster start ~15 s, the Ray job ~30 s, in-process job ~8 s).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import tiny_job

import cluster.ray_executor as ray_executor
from runner.config import parse_config
from runner.job import run_job

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.own_cluster]

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024**2}


@pytest.fixture
def two_nodes(monkeypatch):
    # Ray 2.60 swaps 127.0.0.1 for this machine's outward IP unless its multi-node switch is off;
    # keep every process of the simulated cluster on loopback (cluster.ray_session does the same
    # for the driver when it joins a 127.0.0.1 address).
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    constants = ray._private.ray_constants  # connect() flips it: restore it after the test
    monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    sim = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args=NODE | {"num_cpus": 1, "include_dashboard": False},
        shutdown_at_exit=True,
    )
    try:
        node = sim.add_node(num_cpus=1, **NODE)
        sim.wait_for_nodes()
        yield sim, node
    finally:
        if ray.is_initialized():
            ray.shutdown()
        sim.shutdown()


def _events(out) -> list[dict]:
    path = out / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plans(out) -> dict:
    return {
        stage: json.loads((out / "stages" / stage / "plan.json").read_text())
        for stage in ("00_layers", "02_heads", "04_channels")
    }


def test_two_nodes_same_plans_and_a_lost_node_is_survived_and_reported(
    two_nodes, tmp_path, monkeypatch
):
    sim, node = two_nodes
    executors: list = []
    init = ray_executor.RayExecutor.__init__

    def capture(self, *args, **kwargs):  # the test needs the job's actor handles
        init(self, *args, **kwargs)
        executors.append(self)

    monkeypatch.setattr(ray_executor.RayExecutor, "__init__", capture)
    raw = tiny_job(cluster={"executor": "ray", "workers": 2, "address": sim.address})
    out, failure = tmp_path / "two_nodes", []

    def job():
        try:
            run_job(parse_config(raw), out, log=lambda m: None)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 120
    while not executors:
        assert time.monotonic() < deadline and thread.is_alive(), failure
        time.sleep(0.1)
    executor = executors[0]
    where = ray.get([actor.where.remote() for actor in executor.actors])
    placement = {f"worker-{i}": w["node"] for i, w in enumerate(where)}
    assert sorted(placement.values()) == sorted([sim.head_node.node_id, node.node_id])
    lost_i = [w["node"] for w in where].index(node.node_id)  # the worker on the node to remove
    lost_name, kept_name = f"worker-{lost_i}", f"worker-{1 - lost_i}"
    victim = executor.actors[lost_i]
    ray.get(victim.set_test_delays.remote(estimate_s=2.0))  # slow in every estimate
    while not any(e["event"] == "estimate_start" and e["stage"] == "heads" for e in _events(out)):
        assert time.monotonic() < deadline and thread.is_alive(), failure
        time.sleep(0.1)
    time.sleep(0.5)  # the victim is inside its heads estimate
    sim.remove_node(node, allow_graceful=False)
    thread.join(timeout=240)
    assert not thread.is_alive(), "the job did not finish after the node was removed"
    assert not failure, failure

    local = tmp_path / "local"
    run_job(parse_config(tiny_job()), local, log=lambda m: None)
    for stage, want in _plans(local).items():
        got = _plans(out)[stage]
        assert got["keep"] == want["keep"] and got["drop_layers"] == want["drop_layers"], stage
        for a, b in zip(got["scores"], want["scores"]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-9)

    events = _events(out)
    started = {e["worker"]: e["node"] for e in events if e["event"] == "worker_start"}
    assert started == placement
    (lost,) = [e for e in events if e["event"] == "worker_lost"]
    assert lost["worker"] == lost_name and lost["node"] == node.node_id
    assert lost["ip"] == "127.0.0.1" and lost["pid"] == where[lost_i]["pid"]
    assert lost["seconds"] > 0.3 and lost["task"].startswith(
        f"estimate heads/taylor on shard {lost_i}"
    )
    (rerun,) = [e for e in events if e["event"] == "task_rerun"]
    assert rerun["task"] == lost["task"] and rerun["worker"] == kept_name
    assert rerun["node"] == sim.head_node.node_id and rerun["lost_with"] == lost_name
    assert rerun["version"] == lost["version"]
    heads_end = next(e for e in events if e["event"] == "estimate_end" and e["stage"] == "heads")
    assert heads_end["version"] == lost["version"]
    barriers = [e for e in events if e["event"] == "barrier"]
    assert len(barriers[0]["workers"]) == 2 and len(barriers[-1]["workers"]) == 1
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    lost_line = next(w for w in warnings if "was lost during" in w)
    assert lost_name in lost_line and node.node_id[:8] in lost_line
    assert any(f"re-ran on {kept_name}" in w for w in warnings)
