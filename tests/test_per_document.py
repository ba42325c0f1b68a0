"""benchmarks/per_document.py puts every document in the split the job puts it in: its "test"
rows are the documents a job's report scores as held out, never ones recovery trained on."""

from __future__ import annotations

import sys
from pathlib import Path

from runner.config import parse_config
from runner.demo_models import build_tokenizer
from runner.tasks.causal_lm import text_splits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import per_document  # noqa: E402  (a benchmark script)


def stdlib_job(seed: int) -> dict:
    return {
        "task": "causal_lm",
        "models": [{"ref": "unused", "max_length": 64}],
        "data": {
            "seed": seed,
            "validation_fraction": 0.1,
            "test_fraction": 0.2,
            "sources": [{"path": "builtin:stdlib_docs", "domain": "docs"}],
        },
        "target": {"ratio": 1.5},
        "stages": [{"kind": "channels", "criterion": "wanda", "share": 1.0}],
    }


def test_splits_are_the_jobs_and_the_train_sample_keeps_every_held_out_document() -> None:
    for seed in (3,):  # not the default 0: the seed must reach the assignment
        cfg = parse_config(stdlib_job(seed))
        docs = per_document.documents_by_split(cfg, "docs")
        tokenizer = build_tokenizer([text for _, _, text in docs[:3]])
        held_out = text_splits(cfg, cfg.models[0], tokenizer).test_documents["docs"]
        assert sorted(o for s, o, _ in docs if s == "test") == sorted(d.origin for d in held_out)
        counts = {s: sum(d[0] == s for d in docs) for s in ("train", "validation", "test")}
        assert counts["validation"] >= 1 and counts["train"] > counts["test"]
        sample = per_document.sample_train(docs, 4, seed)
        assert sum(s == "train" for s, _, _ in sample) == 4
        assert [d for d in docs if d[0] != "train"] == [d for d in sample if d[0] != "train"]
