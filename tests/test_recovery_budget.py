"""Recovery budgets in tokens (`recovery.tokens`, runner/recovery_budget.py): every schedule's
split sums to the total, steps follow from tokens / (batch_size x block length), compare methods
get the same tokens, bad settings are refused, and a job trains the budget it was given."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_job

from runner.compare import CompareConfig, load_compare_config, recovery_budget
from runner.config import ConfigError, parse_config
from runner.job import run_job
from runner.methods import compose, load_method
from runner.recovery_budget import (
    cumulative_shares,
    max_rows,
    planned_steps,
    steps_from_tokens,
    token_split,
)

DENSE, TARGET = 1_000_000, 500_000


def job(schedule: str = "steps", tokens: int | None = 10_000, **recovery) -> dict:
    raw = tiny_job()
    raw["stages"][1]["steps"], raw["stages"][3]["steps"], raw["stages"][5]["steps"] = 2, 2, 6
    raw["recovery"] = {"schedule": schedule, **({"tokens": tokens} if tokens else {}), **recovery}
    return raw


@pytest.mark.parametrize("schedule", ["steps", "equal", "final_heavy", "proportional"])
@pytest.mark.parametrize("total", [1, 999, 10_000, 123_457])
def test_every_schedule_splits_exactly_the_total(schedule, total):
    cfg = parse_config(job(schedule, total))
    seen = [900_000, 800_000, 500_000]  # params when each recover stage starts
    tokens = token_split(total, cumulative_shares(cfg, seen, DENSE, TARGET))
    assert sum(tokens) == total and len(tokens) == 3 and min(tokens) >= 0


def test_what_each_schedule_gives_each_stage():
    seen = [900_000, 800_000, 500_000]  # removed 100k, 100k, 300k of the planned 500k
    split = {
        s: token_split(10_000, cumulative_shares(parse_config(job(s)), seen, DENSE, TARGET))
        for s in ("steps", "equal", "final_heavy", "proportional")
    }
    assert split["steps"] == [2_000, 2_000, 6_000]  # as the stages' own steps 2 / 2 / 6
    assert split["equal"] == [3_333, 3_333, 3_334]
    assert split["final_heavy"] == [2_500, 2_500, 5_000]  # final_share 0.5
    assert split["proportional"] == [2_000, 2_000, 6_000]
    heavier = parse_config(job("final_heavy", final_share=0.8))
    assert token_split(10_000, cumulative_shares(heavier, seen, DENSE, TARGET)) == [
        1_000,
        1_000,
        8_000,
    ]


def test_proportional_is_decided_stage_by_stage_and_the_last_stage_takes_the_rest():
    cfg = parse_config(job("proportional"))
    first = token_split(10_000, cumulative_shares(cfg, [750_000], DENSE, TARGET))
    assert first == [5_000]  # half the planned removal so far
    # the job removed more than planned before the second stage: it gets the rest, none is left
    assert token_split(10_000, cumulative_shares(cfg, [750_000, 400_000], DENSE, TARGET)) == [
        5_000,
        5_000,
    ]
    assert (
        token_split(10_000, cumulative_shares(cfg, [750_000, 400_000, 300_000], DENSE, TARGET))[2]
        == 0
    )


def test_steps_follow_tokens_and_carry_rounding_so_the_total_stays_within_half_a_step():
    per_step = [8 * 96, 16 * 96, 8 * 96]
    for total in (100, 5_000, 49_152, 100_003):
        tokens = token_split(total, [0.2, 0.5, 1.0])
        steps = steps_from_tokens(tokens, per_step)
        trained = sum(n * p for n, p in zip(steps, per_step))
        assert abs(trained - total) <= per_step[-1] / 2
    assert steps_from_tokens([4 * 128 * 8], [8 * 128]) == [4]


def test_without_tokens_each_stage_runs_its_own_steps_and_the_recovery_split_covers_them():
    cfg = parse_config(job(tokens=None))
    assert planned_steps(cfg, 96, [0, 0, 0], DENSE, TARGET) == [2, 2, 6]
    assert max_rows(cfg, 96) == 6 * 8
    budget = parse_config(job("equal", 8 * 96 * 9))  # 9 steps' worth, equal thirds
    assert planned_steps(budget, 96, [0, 0, 0], DENSE, TARGET) == [3, 3, 3]
    assert max_rows(budget, 96) == 3 * 8
    # proportional is known only as parameters go: any stage may need all of the budget
    assert max_rows(parse_config(job("proportional", 8 * 96 * 9)), 96) == 9 * 8


@pytest.mark.parametrize(
    "recovery, message",
    [
        ({"schedule": "equal"}, "recovery.schedule: equal splits recovery.tokens"),
        ({"data": "self"}, "recovery.data: self generates text; task classification"),
    ],
)
def test_settings_recovery_cannot_honour_are_refused(recovery, message):
    raw = tiny_job(recovery=recovery)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_a_proportional_schedule_needs_a_target_and_tokens_need_a_recover_stage():
    raw = job("proportional")
    raw["target"] = {}
    raw["stages"] = [{"kind": "layers", "criterion": "block_influence", "count": 1}] + raw[
        "stages"
    ][1:2]
    with pytest.raises(ConfigError, match="proportional needs the parameters"):
        parse_config(raw)
    raw = tiny_job(recovery={"tokens": 100})
    raw["stages"] = raw["stages"][:1]
    with pytest.raises(ConfigError, match="no recover stage to spend them"):
        parse_config(raw)


def test_compare_methods_get_the_same_tokens_whatever_their_batch_sizes():
    base = {k: v for k, v in tiny_job().items() if k != "stages"}
    cfg = CompareConfig(
        methods=["cascade", "one_shot", "l2_mlp_kd", "shortgpt"],
        ratios=[2.0],
        recovery_tokens=50_000,
        recovery_schedule="final_heavy",
        recovery={"batch_size": 4},
        job=base,
    )
    block = 96
    trained = {}
    for method in cfg.methods:
        preset = load_method(method)
        if method == "one_shot":  # a preset's own batch size wins: another batch, same tokens
            preset.stages[-1]["batch_size"] = 16
        job_cfg = compose(base, preset, ratio=2.0, recovery=cfg.recovery, **recovery_budget(cfg))
        stages = [s for s in job_cfg.stages if s.kind == "recover"]
        steps = planned_steps(job_cfg, block, [0] * len(stages), DENSE, TARGET)
        trained[method] = sum(n * s.batch_size * block for n, s in zip(steps, stages))
        assert job_cfg.recovery.tokens == (None if method == "shortgpt" else 50_000)
    for method in ("cascade", "one_shot", "l2_mlp_kd"):
        assert abs(trained[method] - 50_000) <= 16 * block / 2
    assert trained["shortgpt"] == 0


def test_compare_file_takes_tokens_or_steps_not_both(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        json.dumps(
            {
                "methods": ["cascade"],
                "ratios": [2],
                "recovery_steps": 10,
                "recovery_tokens": 100,
                "job": {"models": ["demo-tiny-gpt2"]},
            }
        )
    )
    with pytest.raises(ConfigError, match="give recovery_tokens or recovery_steps, not both"):
        load_compare_config(path)


def test_a_job_trains_the_token_budget_it_was_given(tmp_path):
    raw = job("proportional", tokens=20 * 8 * 40)
    raw["output"] = {"progress": False, "plots": False, "save_stage_models": False}
    raw["sia"] = {"enabled": False}
    cfg = parse_config(raw)
    run_job(cfg, tmp_path, force=True, log=lambda m: None)
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "recover_start"]
    block = starts[0]["tokens"] // (starts[0]["steps"] * 8) if starts[0]["steps"] else None
    total = sum(e["tokens"] for e in starts)
    assert len(starts) == 3 and block is not None
    assert abs(total - 20 * 8 * 40) <= 8 * block / 2
    assert all(e["tokens"] == e["steps"] * 8 * block for e in starts)
