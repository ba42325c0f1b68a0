"""--resume ends where a clean run ends, or refuses: kd teachers are rebuilt from the stored version
they came from (never the model as it is now), and a stage made with other settings is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_checks import one_line_error, run_cli
from conftest import tiny_job

import runner.pipeline as pipeline
from runner.config import parse_config
from runner.errors import JobError
from runner.job import run_job
from runner.resume import teachers_to_restore
from stages.checkpoint import load_pruned


def kd_job(**overrides) -> dict:
    raw = tiny_job(**overrides)
    for stage in raw["stages"]:
        if stage["kind"] == "recover":
            stage |= {"loss": "kd", "teacher": "pre_stage"}
    return raw


def stages_of(*kinds: str):
    """'p' a prune stage, 'r' a ce recover, 'k' a kd recover from pre_stage, 'd' kd from dense."""
    raw = []
    for kind in kinds:
        if kind == "p":
            raw.append({"kind": "channels", "criterion": "l2", "ratio": 0.1})
        else:
            loss = {"r": {}, "k": {"loss": "kd"}, "d": {"loss": "kd", "teacher": "dense"}}[kind]
            raw.append({"kind": "recover", "steps": 1} | loss)
    return parse_config(tiny_job(stages=raw)).stages


@pytest.mark.parametrize(
    "kinds, first, streamed, expected",
    [
        ("pkpk", 1, False, {"pre_stage": 0}),  # at the kd recover: the input of stage 0
        ("pkpk", 3, False, {"pre_stage": 2}),
        ("pkpk", 2, False, {}),  # resumed at a prune stage: it makes its own teacher
        ("pkprk", 4, False, {"pre_stage": 0}),  # stage 2 makes none (a ce recover follows it)
        ("pkprpk", 3, False, {}),
        ("ppk", 2, False, {"pre_stage": 1}),  # the last prune before the recover wins
        ("kkp", 1, False, {"dense": 0}),  # no prune before: the input of the first kd recover
        ("rkkp", 2, False, {"dense": 1}),
        ("pdk", 2, False, {"dense": 0}),  # a dense teacher exists: the fallback reads it
        ("ppk", 2, True, {}),  # streamed prune stages cache no teacher: made at stage 2
        ("ppkk", 3, True, {"dense": 2}),
        ("pkk", 2, True, {"dense": 1}),
    ],
)
def test_teachers_to_restore_mirrors_the_clean_run(kinds, first, streamed, expected):
    assert teachers_to_restore(stages_of(*kinds), first, streamed) == expected


def crash_at_recover(monkeypatch, n: int) -> None:
    real, calls = pipeline.recover_stage, {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "recover_stage", crash)


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_pruned(a).state_dict(), load_pruned(b).state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_kd_resume_after_the_prune_stage_distils_from_the_stored_pre_stage_model(
    tmp_path, monkeypatch
):
    cfg = parse_config(kd_job())
    run_job(cfg, tmp_path / "clean", log=lambda m: None)
    out = tmp_path / "resumed"
    crash_at_recover(monkeypatch, 2)  # the kd recover after the heads stage
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(cfg, out, log=lambda m: None)
    monkeypatch.undo()
    logs: list[str] = []
    run_job(cfg, out, resume=True, log=logs.append)
    assert any("pre_stage teacher rebuilt from the model that entered stage 2" in m for m in logs)
    assert same_weights(out / "checkpoint", tmp_path / "clean" / "checkpoint")


@pytest.fixture
def interrupted(tmp_path, monkeypatch) -> Path:
    """A tiny job stopped in its second recover: stages 00-02 finished."""
    out = tmp_path / "out"
    crash_at_recover(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        run_job(parse_config(tiny_job()), out, log=lambda m: None)
    monkeypatch.undo()
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_resume_from_an_edited_job_yaml_is_refused_naming_the_change(interrupted, capsys):
    job = interrupted / "job.yaml"
    original = job.read_text()
    raw = yaml.safe_load(original)
    raw["target"]["ratio"] = 3.0
    raw["output"]["progress"] = True  # changes nothing computed: not named
    job.write_text(yaml.safe_dump(raw))
    before = snapshot(interrupted)
    code, err, _ = run_cli(["run", str(job), "-o", str(interrupted), "--resume"], capsys)
    one_line_error(
        code, err, "stage 00_layers was made with other settings", "target.ratio 2.0 -> 3.0"
    )
    assert "progress" not in err and len(err.splitlines()) == 1
    assert snapshot(interrupted) == before
    raw["target"]["ratio"] = 2.0
    job.write_text(yaml.safe_dump(raw))  # only progress differs now: resumes
    code, err, _ = run_cli(["run", str(job), "-o", str(interrupted), "--resume", "--quiet"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("damage", ["truncate_metrics", "drop_settings", "bad_settings"])
def test_resume_with_a_damaged_stage_record_is_one_line(interrupted, damage):
    stage = interrupted / "stages" / "01_recover1"
    if damage == "truncate_metrics":
        text = (stage / "metrics.json").read_text()
        (stage / "metrics.json").write_text(text[: len(text) // 2])
        match = "metrics.json is unreadable .*JSONDecodeError"
    elif damage == "drop_settings":
        (stage / "settings.json").unlink()
        match = "has no settings.json"
    else:
        (stage / "settings.json").write_text(json.dumps([1]))
        match = "settings.json is not a JSON object"
    with pytest.raises(JobError, match=match):
        run_job(parse_config(tiny_job()), interrupted, resume=True, log=lambda m: None)
    shutil.rmtree(interrupted)
