"""End-to-end cascade on a tiny built-in model: outputs, event order, checkpoint, resume."""

import json

import pytest
import torch
from conftest import tiny_job

from runner.config import parse_config
from runner.errors import JobError
from runner.job import run_job
from stages.checkpoint import load_pruned
from stages.objectives import get_objective
from stages.split import encode_split

pytestmark = pytest.mark.slow

REPORT_KEYS = {
    "model": {"name", "architecture", "attention", "mlp", "params"},
    "final": {
        "params",
        "dense_params",
        "compression_ratio",
        "accuracy",
        "dense_accuracy",
        "macro_f1",
    },
    "timing": {"total_seconds", "per_stage"},
}


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    reports = run_job(parse_config(tiny_job()), out, log=lambda m: None)
    return out, reports["demo-tiny-gpt2"]


def events_of(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def test_outputs_follow_the_contract(finished_job):
    out, report = finished_job
    for name in (
        "job.yaml",
        "events.jsonl",
        "report.json",
        "report.md",
        "plots/stages.png",
        "checkpoint/config.json",
        "checkpoint/manifest.json",
    ):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "report.json").read_text())
    for section, keys in REPORT_KEYS.items():
        assert keys <= set(on_disk[section]), section
    assert {
        "name",
        "kind",
        "version",
        "params_before",
        "params_after",
        "accuracy",
        "seconds",
    } <= set(on_disk["stages"][0])
    assert [s["kind"] for s in on_disk["stages"]] == [
        "layers",
        "recover",
        "heads",
        "recover",
        "channels",
        "recover",
    ]
    for stage_dir in ("00_layers", "02_heads", "04_channels"):
        plan = json.loads((out / "stages" / stage_dir / "plan.json").read_text())
        assert plan["scores"] and plan["params_to_remove"] > 0
    assert on_disk["sia"]["threshold"] == 0.5 and "details" in on_disk["sia"]
    # a trained demo model is above chance, so no warning; it was not fine-tuned by the job
    assert on_disk["warnings"] == [] and on_disk["final"]["dense_finetune"] is None


def test_target_ratio_is_reached_and_params_really_drop(finished_job):
    _, report = finished_job
    final = report["final"]
    assert final["params"] < final["dense_params"]
    assert final["compression_ratio"] == pytest.approx(2.0, rel=0.06)
    afters = [s["params_after"] for s in report["stages"]]
    assert afters == sorted(afters, reverse=True)


def test_importance_only_after_recovery_and_barrier(finished_job):
    out, _ = finished_job
    events = events_of(out)
    names = [e["event"] for e in events]
    assert names[0] == "job_start" and names[-1] == "job_end"
    last_recover_end = None
    last_barrier_version = None
    for e in events:
        if e["event"] == "recover_end":
            last_recover_end = e["version"]
        if e["event"] == "barrier":
            last_barrier_version = e["version"]
            assert all(w["version"] == e["version"] for w in e["workers"])
        if e["event"] == "estimate_start" and e["stage"] != "layers":
            assert e["version"] == last_recover_end, (
                "importance estimated on a model that was not recovered"
            )
            assert last_barrier_version == e["version"], (
                "no barrier at this version before estimation"
            )


def test_checkpoint_reloads_with_the_reported_accuracy(finished_job):
    out, report = finished_job
    model = load_pruned(out / "checkpoint")
    assert sum(p.numel() for p in model.parameters()) == report["final"]["params"]
    from runner.data.bearing import build_dataset
    from runner.models import load_model

    cfg = parse_config(tiny_job())
    _, tokenizer = load_model("demo-tiny-gpt2", progress=False, data_cfg=cfg.data)
    test = encode_split(build_dataset(cfg.data)["test"], tokenizer, 96)
    accuracy = get_objective("classification").evaluate(model, test).accuracy
    assert accuracy == pytest.approx(report["final"]["accuracy"])


def test_existing_output_is_refused_without_force(finished_job):
    out, _ = finished_job
    with pytest.raises(JobError, match="already holds results"):
        run_job(parse_config(tiny_job()), out, log=lambda m: None)


def test_resume_after_a_crash_gives_the_same_checkpoint(tmp_path, finished_job, monkeypatch):
    reference_dir, _ = finished_job
    cfg = parse_config(tiny_job())
    import runner.pipeline as pipeline

    real = pipeline.recover_stage
    calls = {"n": 0}

    def crash_on_second_recovery(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "recover_stage", crash_on_second_recovery)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(cfg, tmp_path, log=lambda m: None)
    monkeypatch.setattr(pipeline, "recover_stage", real)
    done = sorted(p.name for p in (tmp_path / "stages").iterdir() if p.is_dir())
    assert done == ["00_layers", "01_recover1", "02_heads"]
    run_job(cfg, tmp_path, resume=True, log=lambda m: None)
    assert "resume" in [e["event"] for e in events_of(tmp_path)]
    resumed = load_pruned(tmp_path / "checkpoint").state_dict()
    reference = load_pruned(reference_dir / "checkpoint").state_dict()
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


def test_accuracy_collapse_guard_rolls_back_retries_then_fails(tmp_path):
    raw = tiny_job(guards={"max_accuracy_drop": 1e-6, "retries": 1, "retry_shrink": 0.5})
    raw["stages"] = [{"kind": "channels", "criterion": "l2", "ratio": 0.9}]
    with pytest.raises(JobError, match="collapsed"):
        run_job(parse_config(raw), tmp_path, log=lambda m: None)
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("error") == 2 and "retry" in kinds
    assert "prune" not in kinds  # nothing collapsed was kept
