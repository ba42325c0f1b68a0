"""Recovery trains on the rows it can reach: the whole train split when it is small, else a seeded
subset of steps x batch_size rows in split order (KD teachers are computed for those rows only)."""

from __future__ import annotations

import torch
from conftest import tiny_job

from runner.config import parse_config
from runner.setup_run import add_recovery_split
from runner.tasks import TaskData
from stages.split import EncodedSplit


def _data(rows: int) -> TaskData:
    ids = torch.arange(rows * 3).reshape(rows, 3)
    return TaskData({"train": EncodedSplit(ids, torch.ones_like(ids), torch.zeros(rows).long())})


def test_small_train_split_is_used_whole() -> None:
    cfg = parse_config(tiny_job())  # recover stages: 4 steps x batch 8 = 32 rows
    data = _data(30)
    add_recovery_split(cfg, data)
    assert data.splits["recovery"] is data.splits["train"]


def test_large_train_split_gives_a_seeded_subset_in_split_order() -> None:
    cfg = parse_config(tiny_job())
    a, b = _data(500), _data(500)
    add_recovery_split(cfg, a)
    add_recovery_split(cfg, b)
    rows = a.splits["recovery"].input_ids[:, 0] // 3
    assert len(rows) == 32 and torch.equal(rows, rows.sort().values)
    assert torch.equal(a.splits["recovery"].input_ids, b.splits["recovery"].input_ids)
    other = parse_config(tiny_job(seed=1))
    c = _data(500)
    add_recovery_split(other, c)
    assert not torch.equal(c.splits["recovery"].input_ids, a.splits["recovery"].input_ids)
