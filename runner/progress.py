"""Progress of long work (calibration passes, recovery and fine-tune steps, batches of jobs).

On a terminal (stderr is a TTY) with output.progress on: a tqdm bar. Otherwise, when the caller
gives its log function: a line at least every HEARTBEAT_S seconds (step, loss, rate, time left),
so a log file or `cascade logs` never sits silent through minutes of training.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm


def make_logger(quiet: bool):
    """The job's log function: every line, or (quiet) only warnings."""

    def log(message: str) -> None:
        if not quiet or message.startswith("WARNING"):
            print(message, flush=True)

    return log


HEARTBEAT_S = 30.0


class Heartbeat:
    """on_step(step, loss) that logs a progress line when HEARTBEAT_S seconds passed since the last."""

    def __init__(self, total: int, description: str, log, unit: str, interval: float = HEARTBEAT_S):
        self.total, self.description, self.log, self.unit = total, description, log, unit
        self.interval, self.done = interval, 0
        self.start = self.last = time.monotonic()

    def __call__(self, step: int = 0, loss: float | None = None) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        loss_text = f", loss {loss:.4f}" if loss is not None else ""
        self.log(
            f"[progress] {self.description}: {self.unit} {self.done}/{self.total}{loss_text}, "
            f"{rate:.2f} {self.unit}/s, ~{left:.0f}s left"
        )


@contextmanager
def step_bar(total: int, description: str, enabled: bool, unit: str = "step", log=None):
    """Yields an on_step(step, loss) callback: a tqdm bar when enabled and stderr is a TTY, else a
    Heartbeat logging through `log` (None: nothing to report to)."""
    if total == 0:
        yield None
        return
    if not enabled or not sys.stderr.isatty():
        yield Heartbeat(total, description, log, unit) if log is not None else None
        return
    bar = tqdm(total=total, desc=description, leave=False, file=sys.stderr, unit=unit)

    def on_step(step: int, loss: float | None = None) -> None:
        bar.update(1)
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    try:
        yield on_step
    finally:
        bar.close()


@contextmanager
def count_bar(total: int, description: str, enabled: bool, unit: str, log=None):
    """Yields on_progress(done): for work that reports how many units are finished so far."""
    with step_bar(total, description, enabled, unit, log) as on_step:
        if on_step is None:
            yield None
            return
        seen = [0]

        def on_progress(done: int) -> None:
            while seen[0] < done:
                seen[0] += 1
                on_step(seen[0])

        yield on_progress


@contextmanager
def still_working(description: str, log, interval: float = HEARTBEAT_S):
    """For work with no steps to count (measuring a model, the SIA check): a line every `interval`
    seconds saying what is running and for how long, from a daemon thread, until the block ends."""
    if log is None:
        yield
        return
    done, start = threading.Event(), time.monotonic()

    def beat() -> None:
        while not done.wait(interval):
            log(f"[progress] {description}: {time.monotonic() - start:.0f}s so far")

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
