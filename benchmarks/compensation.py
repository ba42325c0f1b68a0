"""What a cut keeps without any training: compensation, calibration size and the budget split.

    python benchmarks/compensation.py --ratio 1.25 --split channels \\
        --variants none,bias:parallel,lsq:parallel,lsq:sequential --calibration 16,64
    python benchmarks/compensation.py --ratio 1.5 --split 0.4,0.2,0.4 --variants none,lsq:sequential

Loads the job's model and text exactly as configs/smollm2.yaml does (or --config, --set), prunes
the dense model with prune stages only (no recovery) for every variant, and measures perplexity
on the VALIDATION documents of every domain (settings are chosen on validation, never on test)
plus an evaluation-only domain the job never sees (--unseen, default: the licence texts shipped
in /usr/share/common-licenses). Variants are `method[:inputs[:ridge]]` (stages/compensation.py).
`--split channels` prunes FFN channels only; `--split L,H,C` gives the layers / heads / channels
stages those shares of the parameter gap (configs/smollm2.yaml: 0,0.3,0.7; a 0 drops the stage).
Calibration sizes are numbers of blocks of --block tokens. Results: one JSON line per variant
in benchmarks/results/compensation.jsonl (with the command and the CPU), and a table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.compensate_model import prune_in_memory  # noqa: E402
from runner.config import load_config  # noqa: E402
from runner.data.text_sources import pack_tokens  # noqa: E402
from runner.setup_run import setup_model  # noqa: E402
from runner.tasks import get_task  # noqa: E402
from runner.tasks.causal_lm import encoded, text_splits  # noqa: E402
from stages.arch import get_adapter  # noqa: E402
from stages.base import param_count  # noqa: E402
from stages.objectives import get_objective  # noqa: E402
from stages.prune_stage import PruneStage  # noqa: E402
from stages.split import EncodedSplit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "compensation.jsonl"


def cpu() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if "Model name" in ln), "?"
    )
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in text]
    return f"{model} ({platform.machine()}, {', '.join(flags) or 'no avx512'})"


def stages_for(split: str, criterion: str, variant: str) -> list[PruneStage]:
    parts = variant.split(":")
    method, inputs, ridge = (parts + ["sequential", "0.01"][len(parts) - 1 :])[:3]
    comp = {"compensate": method, "compensate_inputs": inputs, "compensate_ridge": float(ridge)}
    if split == "channels":
        return [PruneStage(kind="channels", criterion=criterion, share=1.0, **comp)]
    shares = [float(s) for s in split.split(",")]
    out = []
    for kind, share in zip(("layers", "heads", "channels"), shares):
        if share <= 0:
            continue
        if kind == "layers":
            out.append(PruneStage(kind="layers", criterion="block_influence", share=share))
        else:
            out.append(PruneStage(kind=kind, criterion=criterion, share=share, **comp))
    return out


def unseen_blocks(tokenizer, path: Path, length: int, limit: int) -> EncodedSplit:
    """Blocks of an evaluation-only domain: every file under `path`, one token stream."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    stream = np.concatenate(
        [
            tokenizer(f.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
            for f in files
        ]
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pack_tokens(stream, length, bos=tokenizer.bos_token_id, pad_id=pad)
    return EncodedSplit(
        ids[:limit], mask[:limit], torch.zeros(min(limit, len(ids)), dtype=torch.long)
    )


def measure(model, evals: dict) -> dict[str, float]:
    objective = get_objective("causal_lm")
    return {
        name: round(objective.evaluate(model, split).perplexity, 3) for name, split in evals.items()
    }


def load_dense(config: str, sets: list[str], block: int):
    """The job's dense model and tokenizer as `config` loads them, with blocks of `block` tokens.

    Returns (model, tokenizer, overrides): the overrides every later load_config of the same
    job must repeat so its text is packed the same way."""
    overrides = [f"models.0.max_length={block}", *sets]
    base = load_config(config, overrides)
    model, tokenizer = setup_model(base, base.models[0], get_task("causal_lm"))
    model.eval()
    return model, tokenizer, overrides


def job_data(config: str, overrides: list[str], size: int, tokenizer, eval_blocks: int, unseen):
    """(cfg, evals, calibration micro-batches) of the job with `size` calibration blocks.

    evals: the first `eval_blocks` VALIDATION blocks of every domain ("val:<domain>"), plus
    "unseen" (an evaluation-only domain the job never sees) when that path exists."""
    cfg = load_config(config, [*overrides, f"data.calibration_size={size}"])
    text = text_splits(cfg, cfg.models[0], tokenizer)
    evals = {
        f"val:{d}": encoded(text.validation.of_domain(d).select(range(min(eval_blocks, len(text.validation.of_domain(d))))))
        for d in text.validation.domains
        if len(text.validation.of_domain(d))
    }  # fmt: skip
    if unseen and Path(unseen).exists():
        evals["unseen"] = unseen_blocks(
            tokenizer, Path(unseen), cfg.models[0].max_length, eval_blocks
        )
    calibration = list(encoded(text.calibration).batches(cfg.calibration.batch_size))
    return cfg, evals, calibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2.yaml"))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--ratio", type=float, default=1.25)
    parser.add_argument("--split", default="channels")
    parser.add_argument("--criterion", default="wanda")
    parser.add_argument("--variants", default="none,bias:parallel,lsq:parallel,lsq:sequential")
    parser.add_argument("--calibration", default="16", help="calibration blocks, comma-separated")
    parser.add_argument("--block", type=int, default=256, help="tokens per block")
    parser.add_argument("--eval-blocks", type=int, default=24, help="per domain")
    parser.add_argument("--unseen", default="/usr/share/common-licenses")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer, overrides = load_dense(args.config, args.set, args.block)
    dense_params = param_count(model)
    target = int(dense_params / args.ratio)
    print(f"{args.config}: {dense_params:,} params -> target {target:,} ({args.ratio}x); "
          f"CPU {cpu()}", flush=True)  # fmt: skip
    for size in [int(s) for s in args.calibration.split(",")]:
        cfg, evals, calibration = job_data(
            args.config, overrides, size, tokenizer, args.eval_blocks, args.unseen
        )
        dense = measure(model, evals)
        print(f"calibration {size} x {args.block} tokens; dense {dense}", flush=True)
        for variant in args.variants.split(","):
            work = copy.deepcopy(model)
            adapter = get_adapter(work)
            limits = cfg.target.plan_limits(target)
            stages = stages_for(args.split, args.criterion, variant)
            t0 = time.perf_counter()
            plans = prune_in_memory(work, adapter, stages, calibration, limits)
            seconds = time.perf_counter() - t0
            result = {
                "ratio": args.ratio, "split": args.split, "criterion": args.criterion,
                "variant": variant, "calibration_blocks": size, "block": args.block,
                "params": param_count(work), "seconds": round(seconds, 1),
                "perplexity": measure(work, evals), "dense": dense,
                "calibration_error": [p.compensation.get("layers") and round(
                    sum(e["error_after"] for e in p.compensation["layers"].values())
                    / len(p.compensation["layers"]), 4) for p in plans],
                "command": " ".join(sys.argv), "cpu": cpu(),
            }  # fmt: skip
            print(json.dumps({k: result[k] for k in ("variant", "calibration_blocks", "params",
                  "seconds", "perplexity", "calibration_error")}), flush=True)  # fmt: skip
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(result) + "\n")
            del work


if __name__ == "__main__":
    main()
