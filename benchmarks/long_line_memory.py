"""Peak memory of tokenising one long data.sources line: in pieces (what jobs do) or in one call.

    python benchmarks/long_line_memory.py pieces 10000000   # characters on one line
    python benchmarks/long_line_memory.py whole 10000000

Run each mode in its own process (ru_maxrss only grows). Uses the SmolLM2 tokenizer that
`./launch.sh setup` converted into ~/.cache/cascade (or $CASCADE_CACHE).
"""

from __future__ import annotations

import resource
import sys
import time

from transformers import AutoTokenizer

import runner.data.text_sources as text_sources
from runner import smollm2

WORDS = "the bearing outer race fault shows peaks at the ball pass frequency while load grows"


def main(mode: str, chars: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2.cached_dir())
    words = WORDS.split()
    text = " ".join(words[i % len(words)] for i in range(chars // 6))
    if mode == "whole":
        text_sources._PIECE_CHARS = 1 << 40  # the code before pieces: one call per document
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    tokens = text_sources._Tokens(tokenizer)
    tokens.add(text, "train")
    tokens.flush()
    count = len(tokens.stream("train"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{mode}: {len(text) / 1e6:.1f} M characters, {count / 1e6:.2f} M tokens, peak RSS "
        f"+{(peak - before) / 1024:.0f} MiB, {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
