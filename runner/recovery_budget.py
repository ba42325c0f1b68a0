"""Recovery budgets in tokens: how many steps each recover stage trains (`recovery.tokens`).

A job (or every method of a compare) gets one number of training tokens; the schedule decides
each recover stage's cumulative share F_j of it (nondecreasing, F_last = 1), so the stages' token
shares floor(T F_j) - floor(T F_{j-1}) sum to T exactly. Steps follow from tokens / (batch_size x
block length), carrying each stage's rounding into the next one's, so the trained total stays
within half a step of T. Everything is a pure function of the config and of the parameter counts
seen before each recover stage, so a resumed job recomputes the same steps.
"""

from __future__ import annotations

import math

from runner.config import JobConfig, RecoverStageConfig


def recover_stages(cfg: JobConfig) -> list[RecoverStageConfig]:
    return [s for s in cfg.stages if isinstance(s, RecoverStageConfig)]


def cumulative_shares(
    cfg: JobConfig, params_seen: list[int], dense_params: int, target_params: int | None
) -> list[float]:
    """F_1..F_n for the first n = len(params_seen) recover stages (all of them for the static
    schedules); params_seen[j] = parameters of the model when recover stage j starts."""
    stages, recovery = recover_stages(cfg), cfg.recovery
    m = len(stages)
    if recovery.schedule == "proportional":
        planned = dense_params - (target_params if target_params is not None else dense_params)
        shares = [
            min(1.0, (dense_params - p) / planned) if planned > 0 else 0.0 for p in params_seen
        ]
        return [1.0 if j == m - 1 else f for j, f in enumerate(shares)]
    if recovery.schedule == "equal":
        weights = [1.0] * m
    elif recovery.schedule == "final_heavy":
        rest = (1.0 - recovery.final_share) / (m - 1) if m > 1 else 0.0
        weights = [rest] * (m - 1) + [recovery.final_share if m > 1 else 1.0]
    else:  # steps: in proportion to each stage's own steps
        weights = [float(s.steps) for s in stages]
    total = sum(weights)
    running, shares = 0.0, []
    for j, w in enumerate(weights):
        running += w
        shares.append(1.0 if j == m - 1 else (running / total if total > 0 else 0.0))
    return shares


def token_split(total: int, shares: list[float]) -> list[int]:
    """Each stage's tokens from cumulative shares (sums to `total` when shares end at 1)."""
    marks = [0] + [math.floor(total * f + 1e-9) for f in shares]
    return [b - a for a, b in zip(marks, marks[1:])]


def steps_from_tokens(tokens: list[int], tokens_per_step: list[int]) -> list[int]:
    """Whole steps per stage; each stage trains toward the cumulative token mark, so rounding in
    one stage is made up in the next."""
    steps, trained, mark = [], 0, 0
    for share, per_step in zip(tokens, tokens_per_step):
        mark += share
        n = max(0, round((mark - trained) / per_step))
        steps.append(n)
        trained += n * per_step
    return steps


def planned_steps(
    cfg: JobConfig,
    block_length: int,
    params_seen: list[int],
    dense_params: int,
    target_params: int | None,
) -> list[int]:
    """Steps of the first len(params_seen) recover stages (their `steps` without a token budget)."""
    stages = recover_stages(cfg)[: len(params_seen)]
    if cfg.recovery.tokens is None:
        return [s.steps for s in stages]
    shares = cumulative_shares(cfg, params_seen, dense_params, target_params)
    tokens = token_split(cfg.recovery.tokens, shares)
    return steps_from_tokens(tokens, [s.batch_size * block_length for s in stages])


def max_rows(cfg: JobConfig, block_length: int) -> int:
    """Most training rows one recover stage reads (recovery split size). A proportional
    schedule is only known as the job removes parameters, so any stage may get the whole budget."""
    stages = recover_stages(cfg)
    if not stages:
        return 0
    if cfg.recovery.tokens is not None and cfg.recovery.schedule == "proportional":
        return max(math.ceil(cfg.recovery.tokens / block_length / s.batch_size) * s.batch_size
                   for s in stages)  # fmt: skip
    steps = planned_steps(cfg, block_length, [0] * len(stages), 1, None)
    return max(n * s.batch_size for n, s in zip(steps, stages))
