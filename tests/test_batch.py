"""`cascade batch`: family validation, failure isolation, skipping finished models, Ray dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_DATA
from test_report_html import assert_self_contained, fake_report

import runner.batch as batch
from runner.batch import BatchError, job_config, job_resources, load_family, parse_family, run_batch
from runner.config import ConfigError

FAMILIES = Path(__file__).resolve().parents[1] / "configs" / "families"


def family(**overrides) -> dict:
    raw = {"name": "fam", "models": ["a", "b"], "method": "cascade", "target": {"ratio": 2.0}}
    return raw | overrides


def problems_of(raw: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_family(raw)
    return dict(info.value.problems)


# ----------------------------------------------------------------------------- validation
def test_family_file_lists_every_shape_problem():
    found = problems_of(
        family(
            name="", models=[], target={"ratio": 0.5}, job={"stages": []}, concurrency=0, colour=1
        )
    )
    assert set(found) == {"name", "models", "target.ratio", "job", "concurrency", "colour"}
    assert "unknown key" in found["colour"] and "stages" in found["job"]


def test_family_file_lists_every_semantic_problem():
    found = problems_of(
        family(
            models=["x/a", "y/a"],
            target={"device": "toaster"},
            job={"sia": {"pairs": 1}, "data": {"bogus": 1}},
        )
    )
    assert set(found) == {"models.1", "target.device", "job.sia.pairs", "job.data.bogus"}
    assert "unknown device 'toaster'" in found["target.device"]
    found = problems_of(family(method="no_such_method", stages=None))
    assert "unknown method 'no_such_method'" in found["method"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": [{"kind": "layers", "count": 1}]}, "exactly one of method"),
        ({"method": None}, "exactly one of method"),
        ({"target": {"uniform_layout": True}}, "target needs ratio"),
    ],
)
def test_family_needs_one_method_and_a_target(change, message):
    assert message in " ".join(problems_of(family(**change)).values())


def test_builtin_family_files_are_valid():
    demo = load_family(FAMILIES / "demo.yaml")
    ladders = {f"demo-{a}-{s}" for a in ("gpt2", "llama") for s in "sml"}
    assert {m.ref for m in demo.models} == ladders and demo.method == "cascade"
    tiny = load_family(FAMILIES / "tiny.yaml", ["concurrency=2"])
    assert [m.ref for m in tiny.models] == ["demo-tiny-gpt2", "demo-tiny-llama"]
    assert tiny.concurrency == 2


def test_job_config_runs_in_process_on_the_resources_it_reserves():
    stages = [
        {"kind": "channels", "criterion": "wanda", "ratio": 0.5},
        {"kind": "recover", "steps": 3, "runner": "ray_train"},
    ]
    cluster = {"executor": "ray", "workers": 2, "cpus_per_worker": 1.5, "gpus_per_worker": 0.5}
    fam = parse_family(
        family(
            method=None,
            stages=stages,
            target={"device": "jetson_orin_nano_8gb", "fraction": 0.5},
            job={"cluster": cluster, "data": dict(TINY_DATA)},
        )
    )
    cfg = job_config(fam, fam.models[1])
    assert cfg.cluster.executor == "local" and cfg.stages[1].runner == "local"
    assert cfg.models[0].ref == "b" and cfg.target.device == "jetson_orin_nano_8gb"
    assert cfg.data.samples_per_class_per_load == TINY_DATA["samples_per_class_per_load"]
    assert job_resources(fam) == (3.0, 1.0)
    assert job_resources(parse_family(family())) == (1.0, 0.0)


# ----------------------------------------------------------------------------- orchestration (fake jobs)
class FakeJobs:
    """Stands in for run_one: writes job.yaml + report.json like a real job; refs with 'bad' fail."""

    def __init__(self):
        self.calls: list[tuple[str, bool, bool]] = []

    def __call__(self, cfg_yaml, out, log_path, resume, force, threads):
        out = Path(out)
        self.calls.append((out.name, resume, force))
        if "bad" in out.name:
            return {"status": "failed", "error": "ModelError: no such model", "seconds": 0.1}
        out.mkdir(parents=True, exist_ok=True)
        (out / "job.yaml").write_text(cfg_yaml)
        report = fake_report(out.name, params=400 + 10 * len(self.calls))
        (out / "report.json").write_text(json.dumps(report))
        (out / "report.html").write_text("<html>written by finish.py</html>")  # no job figures
        return {"status": "done", "report": report, "seconds": 0.1}


@pytest.fixture
def fake_jobs(monkeypatch):
    jobs = FakeJobs()
    monkeypatch.setattr(batch, "run_one", jobs)
    return jobs


def test_one_failure_does_not_stop_the_others_and_rerun_skips_finished(tmp_path, fake_jobs):
    fam = parse_family(family(models=["a", "bad", "c"]))
    summary = run_batch(fam, tmp_path, executor="local", log=lambda m: None)
    assert [c[0] for c in fake_jobs.calls] == ["a", "bad", "c"]
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    rows = {r["model"]: r for r in summary["models"]}
    assert (
        rows["bad"]["error"] == "ModelError: no such model" and rows["a"]["compression_ratio"] > 1
    )
    assert json.loads((tmp_path / "family.json").read_text())["counts"] == summary["counts"]
    assert "failed: ModelError" in (tmp_path / "family.md").read_text()
    assert_self_contained((tmp_path / "family.html").read_text())

    fake_jobs.calls.clear()
    again = run_batch(fam, tmp_path, executor="local", log=lambda m: None)
    assert [c[0] for c in fake_jobs.calls] == ["bad"]  # only the unfinished model runs again
    assert again["counts"] == {"done": 0, "skipped": 2, "failed": 1}
    assert [r["accuracy"] for r in again["models"] if r["status"] == "skipped"] == [0.8, 0.8]


def test_unfinished_models_restart_or_resume(tmp_path, fake_jobs):
    fam = parse_family(family(models=["a", "b"]))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "job.yaml").write_text("name: killed half-way\n")
    run_batch(fam, tmp_path, executor="local", log=lambda m: None)
    assert fake_jobs.calls == [("a", False, True), ("b", False, False)]  # restarted with --force
    (tmp_path / "b" / "report.json").unlink()
    fake_jobs.calls.clear()
    run_batch(fam, tmp_path, resume=True, executor="local", log=lambda m: None)
    assert fake_jobs.calls == [("b", True, False)]  # --resume continues after the last stage


def test_finished_model_with_another_config_is_not_reused(tmp_path, fake_jobs):
    run_batch(parse_family(family(models=["a"])), tmp_path, executor="local", log=lambda m: None)
    changed = parse_family(family(models=["a"], target={"ratio": 3.0}))
    summary = run_batch(changed, tmp_path, executor="local", log=lambda m: None)
    assert summary["models"][0]["status"] == "failed"
    assert "different config" in summary["models"][0]["error"]
    assert len(fake_jobs.calls) == 1


def test_output_of_another_family_is_refused(tmp_path, fake_jobs):
    run_batch(parse_family(family(models=["a"])), tmp_path, executor="local", log=lambda m: None)
    with pytest.raises(BatchError, match="holds the batch of family 'fam'"):
        run_batch(
            parse_family(family(name="other")), tmp_path, executor="local", log=lambda m: None
        )


def test_cli_batch_reports_failures_with_exit_status_1(tmp_path, fake_jobs, capsys):
    from runner.cli.main import main

    path = tmp_path / "fam.yaml"
    path.write_text(json.dumps(family(models=["a", "bad"])))
    code = main(["batch", str(path), "-o", str(tmp_path / "out"), "--local", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "1 compressed, 0 reused, 1 failed" in out and "ModelError" in out
    assert main(["batch", str(tmp_path / "missing.yaml")]) == 2


# ----------------------------------------------------------------------------- real jobs
@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> list[str]:
    """Two untrained tiny classifiers (GPT-2, Llama) saved as local HF checkpoints: no training."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from runner.data.bearing import CLASS_NAMES, DataConfig, build_dataset
    from runner.demo_models import DEMO_MODELS, build_tokenizer, demo_config

    root = tmp_path_factory.mktemp("tiny-family")
    tokenizer = build_tokenizer(build_dataset(DataConfig(**TINY_DATA))["train"]["text"])
    paths = []
    for name in ("demo-tiny-gpt2", "demo-tiny-llama"):
        torch.manual_seed(0)
        config = demo_config(
            DEMO_MODELS[name], len(tokenizer), len(CLASS_NAMES), tokenizer.pad_token_id
        )
        path = root / name.removeprefix("demo-")
        AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def _tiny_family(models: list[str], **extra):
    overrides = [f"models=[{', '.join(models)}]"] + [f"{k}={v}" for k, v in extra.items()]
    return load_family(FAMILIES / "tiny.yaml", overrides)


@pytest.mark.slow
def test_tiny_family_end_to_end_with_a_failing_entry(tmp_path, tiny_checkpoints):
    fam = _tiny_family([*tiny_checkpoints, str(tmp_path / "no-such-model")], recovery_steps=3)
    summary = run_batch(fam, tmp_path / "out", executor="local", log=lambda m: None)
    rows = {r["model"]: r for r in summary["models"]}
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    assert "ModelError" in rows["no-such-model"]["error"]
    for name in ("tiny-gpt2", "tiny-llama"):
        assert rows[name]["compression_ratio"] == pytest.approx(1.6, rel=0.1)
        report = json.loads((tmp_path / "out" / name / "report.json").read_text())
        page = (tmp_path / "out" / name / "report.html").read_text()
        assert_self_contained(page)
        assert all(f"<td>{s['name']}</td>" in page for s in report["stages"])
    assert (tmp_path / "out" / "plots" / "size.png").is_file()
    again = run_batch(fam, tmp_path / "out", executor="local", log=lambda m: None)
    assert again["counts"] == {"done": 0, "skipped": 2, "failed": 1}


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_family_runs_concurrently_on_ray(tmp_path, tiny_checkpoints, shared_ray):
    fam = _tiny_family(tiny_checkpoints, recovery_steps=3, concurrency=2)
    lines: list[str] = []
    summary = run_batch(fam, tmp_path, executor="ray", log=lines.append)
    assert summary["execution"]["mode"] == "ray"
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 0}
    # both jobs were in flight before the first one finished
    first_done = next(i for i, m in enumerate(lines) if ": done in" in m)
    assert sum(": submitted" in m for m in lines[:first_done]) == 2


def test_an_in_process_job_gives_the_thread_count_back(tmp_path):
    """run_one sets the job's intra-op threads and restores the caller's (bit-exact tests later in
    the same process depend on one thread)."""
    import torch

    before = torch.get_num_threads()
    result = batch.run_one("name: [", str(tmp_path / "out"), str(tmp_path / "log"), False, False, 3)
    assert result["status"] == "failed"
    assert torch.get_num_threads() == before
