"""Progress bars: a callback on a terminal, nothing in logs or quiet mode."""

import io

from runner.progress import step_bar


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
