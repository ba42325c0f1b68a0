"""The whole cascade on an embedded Ray with 2 workers: same plans as in-process, barriers in order.

The job starts its own Ray and must shut it down (own_cluster: it runs after the tests sharing the
session's Ray, with none running in this process)."""

import json

import pytest
from conftest import tiny_job

from runner.config import parse_config
from runner.job import run_job

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.own_cluster]


def test_ray_job_matches_local_job_and_orders_barriers(tmp_path):
    local = tmp_path / "local"
    distributed = tmp_path / "ray"
    run_job(parse_config(tiny_job()), local, log=lambda m: None)
    run_job(
        parse_config(tiny_job(cluster={"executor": "ray", "workers": 2})),
        distributed,
        log=lambda m: None,
    )
    for stage in ("00_layers", "02_heads", "04_channels"):
        a = json.loads((local / "stages" / stage / "plan.json").read_text())
        b = json.loads((distributed / "stages" / stage / "plan.json").read_text())
        assert a["keep"] == b["keep"] and a["drop_layers"] == b["drop_layers"], stage
        for sa, sb in zip(a["scores"], b["scores"]):
            assert sa == pytest.approx(sb, rel=1e-4, abs=1e-9)
    events = [json.loads(line) for line in (distributed / "events.jsonl").read_text().splitlines()]
    barriers = [e for e in events if e["event"] == "barrier"]
    assert barriers and all(len(e["workers"]) == 2 for e in barriers)
    assert all(w["version"] == e["version"] for e in barriers for w in e["workers"])
    last_barrier = None
    for e in events:
        if e["event"] == "barrier":
            last_barrier = e["version"]
        if e["event"] == "estimate_start":
            assert e["workers"] == 2 and e["version"] == last_barrier
    import ray

    assert not ray.is_initialized(), "the embedded Ray was not shut down"
