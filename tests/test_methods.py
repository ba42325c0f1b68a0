"""Every method preset runs through the same runner on tiny models of both architectures."""

from pathlib import Path

import pytest
import yaml
from conftest import TINY_DATA

from runner.compare import CompareConfig, run_compare
from runner.methods import available_methods

pytestmark = pytest.mark.slow


JOB = {
    "models": ["demo-tiny-gpt2", "demo-tiny-llama"],
    "data": dict(TINY_DATA),
    "calibration": {"batch_size": 8},
    "sia": {"enabled": False},
    "output": {"save_stage_models": False, "plots": False, "progress": False},
}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    cfg = CompareConfig(
        name="tiny-compare",
        methods=available_methods(),
        ratios=[1.5],
        recovery_steps=6,
        job=JOB,
    )
    return out, run_compare(cfg, out, log=lambda m: None)


def test_every_method_runs_on_both_architectures(comparison):
    _, result = comparison
    failures = [(r["model"], r["method"], r["error"]) for r in result["rows"] if "error" in r]
    assert not failures
    assert len(result["rows"]) == 2 * len(available_methods())


def test_methods_reach_the_ratio_or_say_why(comparison):
    _, result = comparison
    for row in result["rows"]:
        if row["method"] == "shortgpt":  # layer removal alone may be too coarse for the exact ratio
            assert row["achieved_ratio"] > 1.0
        else:
            assert row["achieved_ratio"] == pytest.approx(1.5, rel=0.1), (
                row["model"],
                row["method"],
            )


def test_recovery_budget_is_the_same_for_every_trained_method(comparison):
    out, result = comparison
    for row in result["rows"]:
        job = yaml.safe_load((Path(row["dir"]) / "job.yaml").read_text())
        steps = [s["steps"] for s in job["stages"] if s["kind"] == "recover"]
        if row["method"] in ("flap", "shortgpt"):  # training-free by definition
            assert steps == []
        else:
            assert sum(steps) == 6, (row["method"], steps)


def test_compare_outputs_and_rerun_reuses_finished_runs(comparison, tmp_path):
    out, result = comparison
    assert (out / "compare.md").is_file() and (out / "compare.png").is_file()
    table = (out / "compare.md").read_text()
    for method in available_methods():
        assert f"| {method} |" in table
    messages = []
    cfg = CompareConfig(
        name="tiny-compare",
        methods=["flap"],
        ratios=[1.5],
        recovery_steps=6,
        job=dict(JOB, models=["demo-tiny-gpt2"]),
    )
    rerun = run_compare(cfg, out, log=messages.append)
    assert messages == ["[compare] demo-tiny-gpt2 flap 1.5x: finished earlier, reusing"]
    first = next(
        r for r in result["rows"] if r["model"] == "demo-tiny-gpt2" and r["method"] == "flap"
    )
    assert rerun["rows"] == [first]
