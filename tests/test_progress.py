"""Progress: a bar on a terminal, a heartbeat line in logs, nothing when nothing listens."""

import io
import time

import torch

from runner.progress import Heartbeat, step_bar, still_working


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_no_bar_when_quiet_or_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with step_bar(10, "x", enabled=True) as on_step:
        assert on_step is None
    monkeypatch.setattr("sys.stderr", FakeTTY())
    with step_bar(10, "x", enabled=False) as on_step:
        assert on_step is None


def test_bar_counts_steps_on_a_terminal(monkeypatch):
    fake = FakeTTY()
    monkeypatch.setattr("sys.stderr", fake)
    with step_bar(3, "recover1", enabled=True) as on_step:
        for step in range(3):
            on_step(step, 0.5)
    assert "recover1" in fake.getvalue() and "/3" in fake.getvalue()


def test_count_bar_ticks_up_to_the_reported_count(monkeypatch):
    from contextlib import contextmanager

    from runner import progress

    ticks = []

    @contextmanager
    def recording_bar(total, description, enabled, unit, log=None):
        assert (total, unit) == (4, "batch")
        yield lambda step, loss=None: ticks.append(step)

    monkeypatch.setattr(progress, "step_bar", recording_bar)
    with progress.count_bar(4, "heads taylor", enabled=True, unit="batch") as on_progress:
        on_progress(1)
        on_progress(3)  # several units finished at once (e.g. Ray shards)
        on_progress(3)
        on_progress(4)
    assert ticks == [1, 2, 3, 4]


def test_local_estimate_reports_every_calibration_batch():
    from tiny_models import tiny_gpt2

    from cluster.executor import LocalExecutor
    from stages.arch import get_adapter
    from stages.estimate import EstimateRequest

    model = tiny_gpt2()
    adapter = get_adapter(model)
    executor = LocalExecutor(adapter)
    ids = torch.randint(3, 100, (4, 6))
    batches = [
        {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([0, 1, 2, 0]),
        }
    ] * 3
    executor.set_calibration(batches)
    executor.load_version(0, model)
    seen = []
    executor.estimate(EstimateRequest("channels", "wanda"), 0, seen.append)
    assert seen == [1, 2, 3] and executor.progress_units() == 3


def test_logs_get_a_heartbeat_line_when_not_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    lines: list[str] = []
    with step_bar(200, "recover1", enabled=True, log=lines.append) as on_step:
        assert isinstance(on_step, Heartbeat)
        on_step.interval = 0.0  # every step is "30 s later" here
        on_step(0, 2.5)
        on_step(1, 2.25)
    assert len(lines) == 2
    assert lines[-1].startswith("[progress] recover1: step 2/200, loss 2.2500,")
    assert "steps/s" not in lines[-1] and "step/s" in lines[-1] and "s left" in lines[-1]


def test_heartbeat_stays_quiet_between_intervals():
    lines: list[str] = []
    beat = Heartbeat(10, "fine-tune", lines.append, "step", interval=3600.0)
    for step in range(10):
        beat(step, 1.0)
    assert lines == []


def test_still_working_logs_while_the_block_runs_and_stops_after() -> None:
    lines: list[str] = []
    with still_working("measuring the dense model", lines.append, interval=0.05):
        deadline = time.monotonic() + 10
        while len(lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(lines) >= 2, lines
    assert all(line.startswith("[progress] measuring the dense model: ") for line in lines)
    assert lines[-1].endswith("s so far")
    seen = len(lines)
    time.sleep(0.2)
    assert len(lines) == seen  # the heartbeat thread ended with the block
