"""Config validation: every problem listed with its YAML path; shipped configs all parse."""

import json
from pathlib import Path

import pytest
import yaml
from test_report_html import fake_report

from runner.compare import load_compare_config
from runner.config import ConfigError, load_config, parse_config
from runner.methods import available_methods, compose, load_method

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {
    "models": ["demo-tiny-gpt2"],
    "stages": [{"kind": "layers", "criterion": "block_influence", "count": 1}],
}


def problems_of(raw) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return dict(info.value.problems)


JOB_FILES = sorted(p for p in ROOT.glob("configs/*.yaml") if not p.name.startswith("compare"))
COMPARE_FILES = sorted(ROOT.glob("configs/compare*.yaml"))


@pytest.mark.parametrize("path", COMPARE_FILES, ids=lambda p: p.name)
def test_every_shipped_compare_config_parses_and_composes(path):
    cfg = load_compare_config(path)
    for method in cfg.methods:
        for ratio in cfg.ratios:
            job = compose(
                dict(cfg.job, name=cfg.name),
                load_method(method),
                ratio=ratio,
                recovery_steps=cfg.recovery_steps,
                recovery=cfg.recovery,
            )
            assert job.target.ratio == ratio


def test_compare_config_errors_are_collected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "methods": ["cascade", "nope"],
                "ratios": [0.5, 4],
                "recovery": {"batch_size": 0, "learning_rate": 1e-3},
                "job": {"models": ["m"], "stages": []},
            }
        )
    )
    with pytest.raises(ConfigError) as info:
        load_compare_config(path)
    problems = dict(info.value.problems)
    assert {"methods.1", "ratios.0", "job.stages"} <= set(problems)
    assert {"recovery.batch_size", "recovery.learning_rate"} <= set(problems)


def test_compare_recovery_settings_fill_what_a_preset_leaves_unset():
    settings = {"batch_size": 4, "lr": 5e-4}
    comp = compose(MINIMAL, load_method("comp"), ratio=4.0, recovery_steps=30, recovery=settings)
    cascade = compose(MINIMAL, load_method("cascade"), ratio=4.0, recovery=settings)
    (mask,) = [s for s in comp.stages if s.kind == "recover"]
    assert (mask.batch_size, mask.lr) == (4, 0.01)  # the preset's own lr for mask tuning wins
    assert {(s.batch_size, s.lr) for s in cascade.stages if s.kind == "recover"} == {(4, 5e-4)}


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_shipped_job_config_parses(path):
    cfg = load_config(path)
    assert cfg.models and cfg.stages


@pytest.mark.parametrize("name", available_methods())
def test_every_method_preset_composes_into_a_valid_job(name):
    cfg = compose(MINIMAL, load_method(name), ratio=4.0, recovery_steps=30)
    recover_steps = [s.steps for s in cfg.stages if s.kind == "recover"]
    assert not recover_steps or sum(recover_steps) == 30
    assert cfg.target.ratio == 4.0


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="available"):
        load_method("no_such_method")


def test_minimal_config_gets_defaults():
    cfg = parse_config(MINIMAL)
    assert cfg.models[0].ref == "demo-tiny-gpt2"
    assert cfg.stages[0].count == 1
    assert cfg.cluster.executor == "local"


def test_all_problems_are_reported_at_once_with_paths():
    raw = {
        "models": ["m"],
        "bogus": 1,
        "target": {"ratio": 0.5},
        "stages": [
            {"kind": "heads", "criterion": "block_influence", "ratio": 0.5},
            {"kind": "channels", "criterion": "wanda", "ratio": 1.5},
            {"kind": "recover", "lr": -1, "surprise": True},
            {"kind": "explode"},
        ],
    }
    problems = problems_of(raw)
    assert "bogus" in problems and "unknown key" in problems["bogus"]
    assert "target.ratio" in problems
    assert "not valid for heads" in problems["stages.0"]
    assert "stages.1.ratio" in problems
    assert "stages.2.lr" in problems
    assert "stages.2.surprise" in problems
    assert any(k.startswith("stages.3") for k in problems)
    assert len(problems) >= 7


def test_amount_must_be_exactly_one_of_ratio_count_share():
    raw = dict(MINIMAL, stages=[{"kind": "channels", "criterion": "l2", "ratio": 0.2, "count": 3}])
    assert "exactly one of" in problems_of(raw)["stages.0"]


def test_share_needs_a_target():
    raw = dict(MINIMAL, stages=[{"kind": "channels", "criterion": "l2", "share": 1.0}])
    assert any("share" in msg for msg in problems_of(raw).values())


def test_duplicate_stage_names_rejected():
    stage = {"kind": "channels", "criterion": "l2", "count": 1, "name": "x"}
    raw = dict(MINIMAL, stages=[stage, dict(stage)])
    assert any("unique" in msg for msg in problems_of(raw).values())


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [a\nstages: {\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line" in str(info.value) and str(path) in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_apply_and_are_validated(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(path, ["stages.0.count=2", "seed=7", "cluster.workers=3"])
    assert (cfg.stages[0].count, cfg.seed, cfg.cluster.workers) == (2, 7, 3)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["cluster.wrkers=3"])
    assert "cluster.wrkers" in dict(info.value.problems)
    with pytest.raises(ConfigError):
        load_config(path, ["stages.9.count=1"])


def test_compare_keeps_each_models_settings(tmp_path, monkeypatch):
    """A model given as a mapping (fine-tuning, max_length) reaches every compared job intact."""
    import runner.compare as compare

    seen = []

    def fake_run_job(job, out, **kwargs):
        seen.append(job.models[0])
        raise RuntimeError("stop here")

    monkeypatch.setattr(compare, "run_job", fake_run_job)
    cfg = compare.CompareConfig(
        name="keep",
        methods=["cascade", "one_shot"],
        ratios=[1.5],
        recovery_steps=6,
        job={"models": [{"ref": "demo-tiny-gpt2", "finetune_steps": 7, "max_length": 40}]},
    )
    result = compare.run_compare(cfg, tmp_path, log=lambda m: None)
    assert len(seen) == 2 and all(m.finetune_steps == 7 and m.max_length == 40 for m in seen)
    assert all(
        row["model"] == "demo-tiny-gpt2" and "stop here" in row["error"] for row in result["rows"]
    )


def test_two_models_writing_one_output_directory_are_refused_until_named():
    twice = {"models": ["demo-tiny-gpt2", "x/demo-tiny-gpt2"], "stages": MINIMAL["stages"]}
    assert problems_of(twice)["models.1"] == (
        "same output directory 'demo-tiny-gpt2' as models.0; set models.1.name to a distinct value"
    )
    with_other_errors = problems_of(dict(twice, seed="x", stages=[]))
    assert {"models.1", "seed", "stages"} <= set(with_other_errors)  # listed together
    named = dict(twice, models=["demo-tiny-gpt2", {"ref": "x/demo-tiny-gpt2", "name": "second"}])
    assert [m.output_name for m in parse_config(named).models] == ["demo-tiny-gpt2", "second"]
    bad_name = dict(twice, models=[{"ref": "demo-tiny-gpt2", "name": "a/b"}])
    assert "models.0.name" in problems_of(bad_name)


def _fake_compare(monkeypatch, calls: list):
    """run_compare with run_job replaced: records each job and writes what a real run leaves."""
    import runner.compare as compare
    from runner.config import dump_config

    def fake_run_job(job, out, **kwargs):
        calls.append((job.models[0], out))
        out.mkdir(parents=True, exist_ok=True)
        (out / "job.yaml").write_text(dump_config(job))
        report = fake_report(job.models[0].output_name)
        (out / "report.json").write_text(json.dumps(report))
        return {job.models[0].output_name: report}

    monkeypatch.setattr(compare, "run_job", fake_run_job)
    monkeypatch.setattr(compare, "write_compare_report", lambda out, result: None)
    return compare


def test_compare_runs_one_ref_twice_under_distinct_names(tmp_path, monkeypatch):
    calls = []
    compare = _fake_compare(monkeypatch, calls)
    models = [
        {"ref": "demo-tiny-gpt2", "name": "short", "max_length": 32},
        {"ref": "demo-tiny-gpt2", "name": "long", "max_length": 64},
    ]
    cfg = compare.CompareConfig(methods=["cascade"], ratios=[1.5], job={"models": models})
    result = compare.run_compare(cfg, tmp_path, log=lambda m: None)
    assert [r["model"] for r in result["rows"]] == ["short", "long"]
    assert not [r["error"] for r in result["rows"] if "error" in r]
    assert {r["ref"] for r in result["rows"]} == {"demo-tiny-gpt2"}
    assert [(m.max_length, out.relative_to(tmp_path).parts[0]) for m, out in calls] == [
        (32, "short"),
        (64, "long"),
    ]


def test_compare_config_refuses_one_ref_twice_without_names(tmp_path):
    path = tmp_path / "c.yaml"
    models = ["demo-tiny-gpt2", {"ref": "demo-tiny-gpt2", "max_length": 64}]
    path.write_text(
        yaml.safe_dump({"methods": ["cascade"], "ratios": [2], "job": {"models": models}})
    )
    with pytest.raises(ConfigError) as info:
        load_compare_config(path)
    assert "set job.models.1.name" in dict(info.value.problems)["job.models.1"]
    path.write_text(yaml.safe_dump({"methods": ["cascade"], "ratios": [2], "job": {"models": "m"}}))
    assert (
        load_compare_config(path).job["models"] == "m"
    )  # the one-ref shorthand is not a list of letters


def test_a_job_yaml_written_before_a_new_setting_still_counts_as_the_same_job(tmp_path):
    from runner.config import dump_config, same_job
    from runner.job import prepare_output

    cfg = parse_config(dict(MINIMAL, models=[{"ref": "demo-tiny-gpt2", "max_length": 40}]))
    old = yaml.safe_load(dump_config(cfg))
    del old["models"][0]["name"]  # the field did not exist when this run finished
    old["output"]["progress"] = not old["output"]["progress"]  # how it reported, not what it did
    assert same_job(yaml.safe_dump(old), cfg)
    out = tmp_path / "run"
    out.mkdir()
    (out / "job.yaml").write_text(yaml.safe_dump(old))
    prepare_output(cfg, out, resume=True, force=False)  # --resume accepts it
    changed = dict(old, seed=1)
    assert not same_job(yaml.safe_dump(changed), cfg)
    assert not same_job(yaml.safe_dump(dict(old, colour=1)), cfg)  # today's schema rejects it
    assert not same_job("{not: [valid yaml", cfg) and not same_job(None, cfg)


def test_compare_reuses_a_finished_run_only_when_its_settings_match(tmp_path, monkeypatch):
    calls, messages = [], []
    compare = _fake_compare(monkeypatch, calls)

    def cfg(max_length):
        job = {"models": [{"ref": "demo-tiny-gpt2", "max_length": max_length}]}
        return compare.CompareConfig(methods=["one_shot"], ratios=[1.5], job=job)

    compare.run_compare(cfg(32), tmp_path, log=messages.append)
    compare.run_compare(cfg(32), tmp_path, log=messages.append)
    assert len(calls) == 1 and any("reusing" in m for m in messages), messages
    compare.run_compare(cfg(48), tmp_path, log=messages.append)
    assert len(calls) == 2 and calls[1][0].max_length == 48
    assert any("settings changed, running again" in m for m in messages)
