"""Step progress bars for long work (recovery, fine-tuning): shown on a terminal, silent in logs."""

from __future__ import annotations

import sys
from contextlib import contextmanager


@contextmanager
def step_bar(total: int, description: str, enabled: bool):
    """Yields an on_step(step, loss) callback; a tqdm bar only when enabled and stderr is a TTY."""
    if not enabled or total == 0 or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, leave=False, file=sys.stderr, unit="step")

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    try:
        yield on_step
    finally:
        bar.close()
