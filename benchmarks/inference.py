"""Inference benchmark: dense vs pruned latency and peak memory, each measured in its own process.

    python benchmarks/inference.py runs/demo/checkpoint            # a pruned job output
    python benchmarks/inference.py PRUNED --dense DENSE_DIR_OR_DEMO_NAME
    python benchmarks/inference.py                                  # prunes random models itself

Without a checkpoint it builds a random GPT-2 (MHA + GELU) and a random Llama (GQA + SwiGLU) of
~33M parameters, prunes them with the stages/ functions (layers by block influence, heads and
channels by wanda on random calibration tokens; no recovery: speed and memory do not depend on
the weights' values) and measures both versions. The dense reference of a job checkpoint is its
config.pruning.source_model (a demo name or path) unless --dense is given. Measurements are
runner.validate probes: CPU peak RSS growth or CUDA max_memory_allocated, median latency.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runner.validate import validate_checkpoint, validate_model  # noqa: E402
from stages import memory_model as mm  # noqa: E402
from stages.arch import get_adapter  # noqa: E402
from stages.base import apply_plan  # noqa: E402
from stages.budget import Budget  # noqa: E402
from stages.checkpoint import save_checkpoint  # noqa: E402
from stages.estimate import EstimateRequest, estimate_locally  # noqa: E402
from stages.layers import plan_layer_removal  # noqa: E402
from stages.units import plan_unit_removal, total_units  # noqa: E402

RATIOS = {"layers": 0.25, "heads": 0.5, "channels": 0.5}


def random_models() -> dict:
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    common = dict(vocab_size=16000, num_labels=10, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    gpt2 = GPT2Config(n_embd=512, n_layer=8, n_head=8, n_positions=512, **common)
    llama = LlamaConfig(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1536,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **common,
    )
    return {
        "gpt2_mha_gelu": GPT2ForSequenceClassification(gpt2).eval(),
        "llama_gqa_swiglu": LlamaForSequenceClassification(llama).eval(),
    }


def prune_randomly_calibrated(model) -> None:
    """Cascade order, scored on random calibration tokens (8 x 128)."""
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (8, 128), generator=gen)
    batches = [
        {
            "input_ids": ids[i : i + 4],
            "attention_mask": torch.ones_like(ids[i : i + 4]),
            "labels": torch.zeros(4, dtype=torch.long),
        }
        for i in (0, 4)
    ]
    for granularity, criterion in (
        ("layers", "block_influence"),
        ("heads", "wanda"),
        ("channels", "wanda"),
    ):
        scores, stats = estimate_locally(
            model, adapter, batches, EstimateRequest(granularity, criterion)
        )
        budget = Budget(units=int(RATIOS[granularity] * total_units(model, adapter, granularity)))
        common = dict(stage=granularity, criterion=criterion, version_in=0, params_before=0)
        if granularity == "layers":
            plan = plan_layer_removal(model, adapter, scores, budget, **common)
        else:
            plan = plan_unit_removal(
                model, adapter, granularity, scores, budget, stats=stats, **common
            )
        apply_plan(model, adapter, plan)


def measure_job_checkpoint(path: Path, dense: str | None, args) -> dict:
    """A job checkpoint against its dense source (a directory, or a demo name measured via its loader)."""
    meta = mm.meta_model(path)
    pruning = getattr(meta.config, "pruning", None) or {}
    dense = dense or pruning.get("source_model")
    options = dict(
        batch=args.batch, seq_len=args.seq_len, repeats=args.repeats, measure_device=args.on
    )
    if dense and (Path(dense) / "config.json").is_file():
        return validate_checkpoint(path, args.device, dense_path=dense, **options)
    shape = mm.model_shape(meta)
    dense_shape = dataclasses.replace(
        shape, params=int(pruning.get("dense_params") or shape.params)
    )
    return validate_model(
        path,
        shape,
        dense_shape,
        device=args.device,
        dense_ref=dense,
        dtype=mm.stored_dtype(meta),
        **options,
    )


def row(name: str, result: dict) -> dict:
    keys = ("peak_memory", "latency")
    return {
        "model": name,
        "workload": result["workload"],
        "params": result["params"],
        "peak_bytes": {
            "dense": result["dense_peak_bytes"],
            "pruned": result["measured_peak_bytes"],
        },
        "dense_peak_source": result["dense_peak_source"],
        "analytic_bytes": {
            side: (result["analytic"].get(side) or {}).get("total") for side in ("dense", "pruned")
        },
        "latency_ms": result["latency_ms"],
        "reductions": {k: result["reductions"][k] for k in keys},
        "projected_tokens_per_s": result["projected_tokens_per_s"],
        "device_profile": result["device"],
        "measured_on": result["measured_on"],
    }


def print_table(rows: list[dict]) -> None:
    def pct(v):
        return "-" if v is None else f"-{v:.1%}"

    def mib(v):
        return "-" if v is None else f"{v / 2**20:.1f}"

    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    print(
        f"{'model':<18}{'params d/p (M)':>17}{'peak MiB d/p':>16}{'analytic d/p':>16}{'mem':>8}"
        f"{'latency ms d/p':>18}{'lat':>8}"
    )
    for r in rows:
        p, m, lat, est = r["params"], r["peak_bytes"], r["latency_ms"], r["analytic_bytes"]
        params = f"{(p['dense'] or 0) / 1e6:.1f}/{p['pruned'] / 1e6:.1f}"
        print(
            f"{r['model']:<18}{params:>17}{mib(m['dense']) + '/' + mib(m['pruned']):>16}"
            f"{mib(est['dense']) + '/' + mib(est['pruned']):>16}"
            f"{pct(r['reductions']['peak_memory']):>8}{ms(lat['dense']) + '/' + ms(lat['pruned']):>18}"
            f"{pct(r['reductions']['latency']):>8}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", nargs="?", help="pruned checkpoint (default: prune random models)"
    )
    parser.add_argument(
        "--dense", help="dense checkpoint dir or demo name (default: the source model)"
    )
    parser.add_argument(
        "--device", default="jetson_orin_nano_8gb", help="device profile for the verdict"
    )
    parser.add_argument(
        "--on", default=None, help="measure on cpu or cuda (default: cuda if available)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype the random models are saved (and measured) in",
    )
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "inference.json"))
    args = parser.parse_args(argv)
    rows = []
    if args.checkpoint:
        rows.append(
            row(
                Path(args.checkpoint).name,
                measure_job_checkpoint(Path(args.checkpoint), args.dense, args),
            )
        )
    else:
        with tempfile.TemporaryDirectory(prefix="cascade-inference-") as tmp:
            dtype = getattr(torch, args.dtype)
            for name, model in random_models().items():
                dense = save_checkpoint(model.to(dtype), None, Path(tmp) / name / "dense")
                prune_randomly_calibrated(model.float())
                pruned = save_checkpoint(model.to(dtype), None, Path(tmp) / name / "pruned")
                result = validate_checkpoint(
                    pruned,
                    args.device,
                    dense_path=dense,
                    batch=args.batch,
                    seq_len=args.seq_len,
                    repeats=args.repeats,
                    measure_device=args.on,
                )
                rows.append(row(name, result) | {"dtype": args.dtype})
    print_table(rows)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
