"""Layer-streamed pruning benchmarks: a model bigger than the memory budget, and parity.

    python benchmarks/streaming.py big --params 3e9        # ~6 GB bf16 on disk, pruned to 2x
    python benchmarks/streaming.py parity --params 5e8     # streamed == in-memory, fp32

`big` writes a random Llama-style checkpoint (GQA, SwiGLU) in bf16 tensor by tensor (never the
whole model in memory; reused if already there), then prunes it in a FRESH process by layers
(block influence) -> heads (wanda) -> channels (fluctuation + FLAP bias compensation) to half
its parameters with `cluster.stream_prune.stream_prune`, computing in float32 (bf16 matmuls are
~6x slower on this CPU), and reports wall time and that process's peak RSS (VmHWM of
/proc/self/status: anonymous memory AND the file pages mapped while a tensor is copied).
`parity` stores a float32 model, runs the same cascade streamed and in memory
(`estimate_locally` on the whole model, `apply_plan` between stages) and checks that every
score and every plan is identical. Results go to benchmarks/results/streaming_*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.compensate_model import prune_in_memory  # noqa: E402
from cluster.stream_prune import stream_prune  # noqa: E402
from stages.arch import get_adapter  # noqa: E402
from stages.base import param_count  # noqa: E402
from stages.checkpoint import build_on_meta, load_pruned, verify_manifest  # noqa: E402
from stages.prune_stage import PruneStage  # noqa: E402
from stages.stage_plan import PlanLimits  # noqa: E402
from stages.streaming.lazy_weights import ShardWriter  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VOCAB = 32000
STAGES = [
    PruneStage(kind="layers", criterion="block_influence", share=0.3),
    PruneStage(kind="heads", criterion="wanda", share=0.3),
    PruneStage(kind="channels", criterion="fluctuation", share=0.4, compensate="bias"),
]


def status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def loadavg() -> float:
    return os.getloadavg()[0]


# ---- a random Llama-style checkpoint, written tensor by tensor ------------------------------------
def llama_config(params: float, dtype: torch.dtype):
    from transformers import LlamaConfig

    hidden = 3072 if params >= 2e9 else 1536 if params >= 3e8 else 512
    heads = hidden // 128
    kv = max(1, heads // 3)
    inter = round(8 / 3 * hidden / 256) * 256
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * 128 + 3 * hidden * inter + 2 * hidden
    layers = max(2, round((params - 2 * VOCAB * hidden) / per_layer))
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=128,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    return config


def write_random_model(directory: Path, params: float, dtype: torch.dtype, seed: int = 0) -> Path:
    """A random checkpoint at `directory` (kept if complete); one tensor chunk in memory at a time."""
    if (directory / "config.json").is_file():
        print(f"reusing {directory}", flush=True)
        return directory
    config = llama_config(params, dtype)
    model = build_on_meta(config)
    entries = [(n, dtype, tuple(p.shape)) for n, p in model.state_dict().items()]
    total = sum(torch.Size(s).numel() for _, _, s in entries)
    print(f"writing {total / 1e9:.2f}e9 params ({config.num_hidden_layers} layers) to {directory}")
    tmp = directory.with_name(directory.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(tmp, entries, "2GB")
    gen = torch.Generator().manual_seed(seed)
    start = last = time.monotonic()
    for n, (name, _, shape) in enumerate(entries):
        if len(shape) == 1:  # RMSNorm weights around 1
            writer.write(name, (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype))
            continue
        rows = max(1, (64 * 1024**2 // 4) // shape[1])
        chunks = (
            (0.02 * torch.randn((min(rows, shape[0] - r), shape[1]), generator=gen)).to(dtype)
            for r in range(0, shape[0], rows)
        )
        writer.write_chunks(name, chunks)
        if time.monotonic() - last >= 30:
            last = time.monotonic()
            print(f"  {n + 1}/{len(entries)} tensors ({last - start:.0f} s)", flush=True)
    writer.close()
    config.save_pretrained(tmp)
    tmp.rename(directory)
    print(f"written in {time.monotonic() - start:.0f} s", flush=True)
    return directory


def calibration(rows: int, seq: int, batch: int, seed: int = 0) -> list[dict]:
    """Random token rows, every other row right-padded by a quarter, in micro-batches."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=gen)
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[1::2, seq - seq // 4 :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return [
        {"input_ids": ids[i : i + batch], "attention_mask": mask[i : i + batch]}
        for i in range(0, rows, batch)
    ]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- phases ---------------------------------------------------------------------------------------
def phase_prune(args) -> dict:
    """Runs in its own process so that VmHWM is the streamed run's peak alone."""
    torch.set_num_threads(args.threads)
    source = Path(args.source)
    config = json.loads((source / "config.json").read_text())
    dense = sum(torch.Size(s).numel() for s in _shapes(source))
    baseline = status_mib("VmRSS")
    lines: list[tuple[float, str]] = []
    start = time.monotonic()

    def log(line: str) -> None:
        lines.append((round(time.monotonic() - start, 1), line))
        print(f"[{time.monotonic() - start:7.1f} s] {line}", flush=True)

    load_before = loadavg()
    plans = stream_prune(
        source,
        args.out,
        STAGES,
        calibration(args.rows, args.seq, args.batch),
        limits=PlanLimits(params_target=dense // 2),
        compute_dtype=torch.float32,
        attn_implementation="sdpa",
        log=log,
    )
    wall = time.monotonic() - start
    out = Path(args.out)
    result = {
        "source": str(source),
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "dense_params": dense,
        "source_bytes": dir_bytes(source),
        "pruned_params": sum(torch.Size(s).numel() for s in _shapes(out)),  # biases included
        "output_bytes": dir_bytes(out),
        "calibration": {"rows": args.rows, "seq": args.seq, "micro_batch": args.batch},
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(status_mib("VmHWM"), 1),
        "baseline_rss_mib": round(baseline, 1),
        "threads": args.threads,
        "loadavg_start_end": [round(load_before, 2), round(loadavg(), 2)],
        "stages": [
            {
                "stage": p.stage,
                "criterion": p.criterion,
                "removed_units": p.removed_units(),
                "params_before": p.params_before,
                "params_removed": p.params_to_remove,
            }
            for p in plans
        ],
        "log": lines,
    }
    result["peak_over_source"] = round(result["peak_rss_mib"] * 1024**2 / result["source_bytes"], 3)
    return result


def _shapes(source: Path) -> list[tuple[int, ...]]:
    from stages.streaming.lazy_weights import LazyCheckpoint

    checkpoint = LazyCheckpoint(source)
    return [checkpoint.shape(n) for n in checkpoint.names()]


def run_big(args) -> None:
    source = write_random_model(
        Path(args.dir) / f"llama_{args.params:.0e}_bf16", args.params, torch.bfloat16
    )
    out = Path(args.dir) / f"llama_{args.params:.0e}_pruned"
    cmd = [
        sys.executable,
        __file__,
        "prune",
        "--source",
        str(source),
        "--out",
        str(out),
        "--rows",
        str(args.rows),
        "--seq",
        str(args.seq),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--json",
        str(args.json),
    ]
    subprocess.run(cmd, check=True)
    result = json.loads(Path(args.json).read_text())
    t0 = time.monotonic()
    verify_manifest(out)
    result["verify_manifest_s"] = round(time.monotonic() - t0, 1)
    check = subprocess.run(
        [sys.executable, __file__, "check", "--out", str(out)], check=True, capture_output=True
    )
    result["reload"] = json.loads(check.stdout.decode().strip().splitlines()[-1])
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1))


def phase_check(args) -> None:
    """Reload the written checkpoint with load_pruned and run one short forward (own process)."""
    torch.set_num_threads(2)
    model = load_pruned(args.out)
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    layout = json.loads((Path(args.out) / "config.json").read_text())["pruning"]["layout"]
    print(
        json.dumps(
            {
                "params": param_count(model),
                "layers": len(layout),
                "finite_logits": bool(torch.isfinite(logits).all()),
            }
        )
    )


# ---- parity with the in-memory path ---------------------------------------------------------------
def run_parity(args) -> None:
    torch.set_num_threads(args.threads)
    source = write_random_model(
        Path(args.dir) / f"llama_{args.params:.0e}_fp32", args.params, torch.float32
    )
    batches = calibration(args.rows, args.seq, args.batch)
    dense = sum(torch.Size(s).numel() for s in _shapes(source))
    t0 = time.monotonic()
    out = Path(args.dir) / f"llama_{args.params:.0e}_fp32_pruned"
    streamed = stream_prune(
        source,
        out,
        STAGES,
        batches,
        limits=PlanLimits(params_target=dense // 2),
        attn_implementation="sdpa",
    )
    t_stream = time.monotonic() - t0
    t0 = time.monotonic()
    model = load_pruned(source, verify=False, attn_implementation="sdpa")
    memory = prune_in_memory(
        model, get_adapter(model), STAGES, batches, PlanLimits(params_target=dense // 2)
    )
    t_memory = time.monotonic() - t0
    same = [asdict(a) == asdict(b) for a, b in zip(streamed, memory)]
    result = {
        "dense_params": dense,
        "calibration": {"rows": args.rows, "seq": args.seq, "micro_batch": args.batch},
        "streamed_s": round(t_stream, 1),
        "in_memory_s": round(t_memory, 1),
        "plans_identical": same,
        "scores_identical": [a.scores == b.scores for a, b in zip(streamed, memory)],
        "removed_units": [p.removed_units() for p in streamed],
        "pruned_params": sum(torch.Size(s).numel() for s in _shapes(out)),  # biases included
        "loadavg_end": round(loadavg(), 2),
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if not all(same):
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("big", "parity", "prune", "check"):
        p = sub.add_parser(name)
        p.add_argument("--params", type=float, default=3e9 if name == "big" else 5e8)
        p.add_argument("--dir", default="/tmp/cascade-streaming-bench")
        p.add_argument("--rows", type=int, default=8)
        p.add_argument("--seq", type=int, default=128)
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--source")
        p.add_argument("--out")
        p.add_argument("--json")
    args = parser.parse_args()
    if args.json is None:
        args.json = str(RESULTS / f"streaming_{args.cmd}_{args.params:.0e}.json")
    if args.cmd == "big":
        run_big(args)
    elif args.cmd == "parity":
        run_parity(args)
    elif args.cmd == "prune":
        result = phase_prune(args)
        Path(args.json).write_text(json.dumps(result, indent=1))
    else:
        phase_check(args)


if __name__ == "__main__":
    main()
