"""SmolLM2-135M on this machine: one cascade job end to end, where its time goes, and what the
SIA check's sampling costs in precision.

    python benchmarks/smollm2.py job  [--config configs/smollm2.yaml] [--set K=V ...] [-o DIR]
    python benchmarks/smollm2.py sia  [--config configs/smollm2.yaml] [--seeds 3]

`job` runs the job and splits its wall time by phase from events.jsonl (setup = load, data, dense
measurement; sia; each stage; export + measuring the export). `sia` runs the SIA check as the
job would, once per seed (the seed picks the component pairs and the removed fraction), and
reports the spread of the score: what sampling few pairs on few tokens costs in precision.
Targets (issue: laptop-class CPU): a job <= 10 min on 2 cores, the SIA check <= 3 min.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runner.config import load_config  # noqa: E402
from runner.job import run_job  # noqa: E402
from runner.setup_run import setup_model  # noqa: E402
from runner.tasks import get_task  # noqa: E402
from stages.arch import get_adapter  # noqa: E402
from stages.sia import run_sia  # noqa: E402


def phases(events: list[dict], started: float) -> dict[str, float]:
    """Seconds per phase between consecutive milestones of one model's events.jsonl; setup (load,
    data, dense measurement) runs from `started` (time.time()) to the job_start event."""
    start = started
    marks = [("start", started), ("setup", events[0]["ts"])]
    for e in events:
        if e["event"] == "sia":
            marks.append(("sia", e["ts"]))
        elif e["event"] in ("prune", "recover_end"):
            marks.append((e["stage"], e["ts"]))
        elif e["event"] == "job_end":
            marks.append(("export + final measurement", e["ts"]))
    out, previous = {}, start
    for name, ts in marks[1:]:
        out[name] = round(ts - previous, 1)
        previous = ts
    return out


def cmd_job(args) -> dict:
    cfg = load_config(args.config, args.set)
    cfg.output.progress = False
    out = Path(args.output)
    t0, started = time.perf_counter(), time.time()
    (report,) = run_job(cfg, out, force=True, log=print).values()
    wall = time.perf_counter() - t0
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    final = report["final"]
    return {
        "wall_seconds": round(wall, 1),
        "phases": phases(events, started),
        "compression_ratio": round(final["compression_ratio"], 3),
        "params": final["params"],
        "perplexity": {
            "dense": final.get("dense_lm_perplexity"),
            "pruned": final.get("lm_perplexity"),
        },
        "perplexity_by_domain": final.get("perplexity_by_domain"),
        "choice_accuracy": final.get("choice_accuracy"),
        "sia": {k: report["sia"].get(k) for k in ("score", "satisfied", "per_granularity")},
    }


def cmd_sia(args) -> dict:
    cfg = load_config(args.config, args.set)
    task, model_cfg = get_task(cfg.task), cfg.models[0]
    model, tokenizer = setup_model(cfg, model_cfg, task)
    data = task.build_data(cfg, model_cfg, model, tokenizer)
    batches = list(data.splits["calibration"].batches(cfg.calibration.batch_size))
    runs = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        result = run_sia(model, get_adapter(model), batches, cfg.sia, task.objective, seed=seed)
        runs.append({"seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                     "score": result["score"], "per_granularity": result["per_granularity"]})  # fmt: skip
        print(json.dumps(runs[-1]), flush=True)
    scores = [r["score"] for r in runs]
    return {
        "settings": cfg.sia.model_dump(),
        "runs": runs,
        "score_mean": statistics.mean(scores),
        "score_stdev": statistics.stdev(scores) if len(scores) > 1 else None,
        "verdicts": sorted({r["score"] <= cfg.sia.threshold for r in runs}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("job", "sia"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("-o", "--output", default=str(ROOT / "runs" / "bench-smollm2"))
    args = parser.parse_args()
    result = cmd_job(args) if args.what == "job" else cmd_sia(args)
    print(json.dumps(result, indent=1))
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"smollm2_{args.what}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
