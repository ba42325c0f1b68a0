"""Where a pruned causal LM loses: perplexity of every document of a built-in text domain, dense
against one or more pruned checkpoints, by the split the job put it in (train / validation / test).

    python benchmarks/per_document.py runs/smollm2-1.25x/smollm2-135m/checkpoint \\
        [more checkpoints] [--config configs/smollm2.yaml] [--domain docs] [--max-tokens 1024] \\
        [--json benchmarks/results/per_document.json]

The documents and their splits are the job's own (the config's data section and seed, the same
seeded assignment runner/data/text_sources.py makes), so "test" here are the documents the job's
report scores as held out. Each document is read from its start in non-overlapping windows of the
model's max_length (at most --max-tokens tokens per document); a window's loss counts every
token after its first. Why: the report's per-domain figure pools every test block, which hides
whether a pruned model is uniformly worse or fails on a few kinds of text, and whether the
validation documents settings are chosen on look like the test documents at all.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compensation import cpu  # noqa: E402

from runner.config import load_config  # noqa: E402
from runner.data.corpora import builtin_documents  # noqa: E402
from runner.data.text_sources import SPLITS, document_split_codes  # noqa: E402
from runner.setup_run import setup_model  # noqa: E402
from runner.tasks import get_task  # noqa: E402
from runner.tasks.causal_lm import bearing_data  # noqa: E402
from stages.checkpoint import load_pruned  # noqa: E402


def documents_by_split(cfg, domain: str) -> list[tuple[str, str, str]]:
    """(split, origin, text) of every distinct document of the config's `domain` source."""
    source = next((s for s in cfg.data.sources if s.domain_name() == domain), None)
    if source is None or source.builtin is None:
        raise SystemExit(f"--domain {domain}: not a built-in source of the config's data.sources")
    docs = builtin_documents(source.builtin, bearing_data(cfg))
    fractions = (cfg.data.validation_fraction, cfg.data.test_fraction)
    codes = document_split_codes(
        (d.text for d in docs), docs, domain, cfg.data.seed, fractions, "--domain", domain
    )
    kept = [(SPLITS[c], d) for c, d in zip(codes, docs) if c >= 0]  # repeats: dropped, as the job
    return [(s, d.origin or f"#{i}", d.text) for i, (s, d) in enumerate(kept)]


def sample_train(docs: list[tuple[str, str, str]], keep: int, seed: int) -> list:
    """Every validation and test document, and `keep` train documents drawn with `seed`."""
    train = [i for i, d in enumerate(docs) if d[0] == "train"]
    chosen = set(np.random.default_rng(seed).permutation(train)[:keep].tolist())
    return [d for i, d in enumerate(docs) if d[0] != "train" or i in chosen]


@torch.no_grad()
def document_nll(model, ids: list[int], window: int) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens, window by window."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window]])
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum")
        total, count = total + float(nll), count + chunk.shape[1] - 1
    return total, count


def measure(model, docs, tokenizer, window: int, max_tokens: int, label: str) -> list[float]:
    """Perplexity of each document; a line every ~30 s so a long run shows it is alive."""
    out, last = [], time.monotonic()
    for i, (_, _, text) in enumerate(docs):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        nll, n = document_nll(model, ids, window)
        out.append(math.exp(nll / n) if n else float("nan"))
        if time.monotonic() - last > 30:
            print(f"[{label}] {i + 1}/{len(docs)} documents", file=sys.stderr, flush=True)
            last = time.monotonic()
    return out


def summary(rows: list[dict], names: list[str]) -> dict:
    """Per split: documents, and each model's geometric-mean perplexity ratio to the dense."""
    result = {}
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        if not part:
            continue
        result[split] = {"documents": len(part), "dense_ppl_geomean": _geomean(part, "dense")}
        for name in names:
            ratios = [r[name] / r["dense"] for r in part]
            result[split][name] = {
                "ratio_geomean": float(np.exp(np.mean(np.log(ratios)))),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
    return result


def _geomean(rows: list[dict], key: str) -> float:
    return float(np.exp(np.mean([math.log(r[key]) for r in rows])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="pruned checkpoint directories")
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2.yaml"))
    parser.add_argument("--domain", default="docs", help="a built-in source's domain name")
    parser.add_argument("--max-tokens", type=int, default=1024, help="per document")
    parser.add_argument(
        "--train-documents", type=int, default=10, help="train documents measured (a sample)"
    )
    parser.add_argument("--json", help="write the rows and the summary here")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config)
    model_cfg = cfg.models[0]
    docs = sample_train(documents_by_split(cfg, args.domain), args.train_documents, cfg.seed)
    dense, tokenizer = setup_model(cfg, model_cfg, get_task("causal_lm"))
    window, started = model_cfg.max_length, time.time()
    columns = {"dense": measure(dense.eval(), docs, tokenizer, window, args.max_tokens, "dense")}
    del dense
    names = []
    for path in args.checkpoints:
        name = Path(path).resolve().parent.name if Path(path).name == "checkpoint" else path
        names.append(name)
        model = load_pruned(path)
        columns[name] = measure(model, docs, tokenizer, window, args.max_tokens, name)
    rows = [
        {"split": s, "origin": o, **{k: v[i] for k, v in columns.items()}}
        for i, (s, o, _) in enumerate(docs)
    ]
    result = {
        "command": " ".join(sys.argv),
        "cpu": cpu(),
        "seconds": round(time.time() - started, 1),
        "summary": summary(rows, names),
        "rows": rows,
    }
    print_table(rows, names, result["summary"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def print_table(rows: list[dict], names: list[str], summ: dict) -> None:
    print("| split | document | dense | " + " | ".join(f"{n} (x dense)" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in sorted(rows, key=lambda r: (SPLITS.index(r["split"]), r["origin"])):
        cells = " | ".join(f"{r[n]:.1f} ({r[n] / r['dense']:.2f}x)" for n in names)
        print(f"| {r['split']} | {r['origin']} | {r['dense']:.1f} | {cells} |")
    print()
    for split, s in summ.items():
        parts = ", ".join(
            f"{n} {s[n]['ratio_geomean']:.2f}x ({s[n]['ratio_min']:.2f}-{s[n]['ratio_max']:.2f})"
            for n in names
        )
        print(f"{split}: {s['documents']} documents, dense {s['dense_ppl_geomean']:.1f}; {parts}")


if __name__ == "__main__":
    main()
