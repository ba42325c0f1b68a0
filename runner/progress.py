"""Progress bars for long work (calibration passes, recovery steps, batches of jobs).

Shown only on a terminal (stderr is a TTY) and when output.progress is on; CI logs stay clean.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm import tqdm


def make_logger(quiet: bool):
    """The job's log function: every line, or (quiet) only warnings."""

    def log(message: str) -> None:
        if not quiet or message.startswith("WARNING"):
            print(message, flush=True)

    return log


@contextmanager
def step_bar(total: int, description: str, enabled: bool, unit: str = "step"):
    """Yields an on_step(step, loss) callback; a tqdm bar only when enabled and stderr is a TTY."""
    if not enabled or total == 0 or not sys.stderr.isatty():
        yield None
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
def count_bar(total: int, description: str, enabled: bool, unit: str):
    """Yields on_progress(done): for work that reports how many units are finished so far."""
    with step_bar(total, description, enabled, unit) as on_step:
        if on_step is None:
            yield None
            return
        seen = [0]

        def on_progress(done: int) -> None:
            while seen[0] < done:
                seen[0] += 1
                on_step(seen[0])

        yield on_progress
