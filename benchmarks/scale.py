"""Scale path: one full cascade on a random ~N-parameter model, timed phase by phase.

    python benchmarks/scale.py --params 6.25e9 --arch gqa_swiglu --device cuda   # one H100
    python benchmarks/scale.py --params 1e8 --arch mha_gelu --device cpu         # minutes on a laptop

The model is built from a config (GPT-2 style for mha_gelu, Llama style for gqa_swiglu) on the
meta device in bf16 and materialised directly on the target device (no fp32 host copy). The
cascade runs through the stages/ functions in-process (no Ray: the GPU box has none):
calibration forward sweep -> layers (block influence) -> LoRA -> heads (taylor/wanda) -> LoRA ->
channels (wanda) -> LoRA -> export (save_checkpoint) -> validation (subprocess, runner.validate).
Prints per-phase seconds and peak memory (GPU: max_memory_allocated; CPU: peak RSS), and the MFU
of the calibration forward passes = model FLOPs / time / measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages import memory_model as mm  # noqa: E402
from stages.arch import get_adapter  # noqa: E402
from stages.base import apply_plan  # noqa: E402
from stages.budget import Budget  # noqa: E402
from stages.checkpoint import save_checkpoint  # noqa: E402
from stages.estimate import EstimateRequest, estimate_locally  # noqa: E402
from stages.layers import plan_layer_removal  # noqa: E402
from stages.objectives import get_objective  # noqa: E402
from stages.recover import RecoverySettings, recover  # noqa: E402
from stages.split import EncodedSplit  # noqa: E402
from stages.units import plan_unit_removal, total_units  # noqa: E402

NUM_LABELS = 10


# ---- model of a given size -----------------------------------------------------------------------
def choose_shape(params: float, arch: str, vocab: int) -> dict:
    """Hidden size from the usual depth/width ratio (layers ~ hidden / 128), then the layer count
    that brings the total closest to `params` (embeddings included)."""
    hidden = max(256, int(round((params * 128 / 12) ** (1 / 3) / 256)) * 256)
    head_dim = 128 if hidden >= 2048 else 64
    heads = hidden // head_dim
    if arch == "mha_gelu":
        kv_heads, inter = heads, 4 * hidden
        per_layer = 4 * hidden * hidden + 2 * hidden * inter + 13 * hidden
        embed = (vocab + 2048) * hidden
    else:
        kv_heads, inter = max(1, heads // 4), int(math.ceil(3.5 * hidden / 256)) * 256
        per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
        embed = vocab * hidden
    layers = max(2, round((params - embed) / per_layer))
    return {
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate": inter,
        "vocab": vocab,
    }


def model_config(shape: dict, arch: str, max_positions: int):
    from transformers import GPT2Config, LlamaConfig

    common = dict(
        vocab_size=shape["vocab"],
        num_labels=NUM_LABELS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "mha_gelu":
        return GPT2Config(
            n_embd=shape["hidden"],
            n_layer=shape["layers"],
            n_head=shape["heads"],
            n_inner=shape["intermediate"],
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    return LlamaConfig(
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        intermediate_size=shape["intermediate"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **common,
    )


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_on_device(config, device: torch.device, dtype: torch.dtype):
    """Meta-device build in `dtype`, then allocate on `device` and initialise there."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"), default_dtype(dtype):
        model = AutoModelForSequenceClassification.from_config(config)
    model.to_empty(device=device)
    for module in model.modules():
        module._is_hf_initialized = False
    torch.manual_seed(0)
    model.initialize_weights()  # HF init on the device, rotary buffers included
    return model.eval()


def checkpointing(model, enable: bool) -> None:
    """Activation checkpointing for LoRA recovery (renamed in newer transformers 5.x)."""
    if enable:
        on = (
            getattr(model, "activation_checkpointing_enable", None)
            or model.gradient_checkpointing_enable
        )
        kwarg = "activation" if on.__name__.startswith("activation") else "gradient"
        on(**{f"{kwarg}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        off = (
            getattr(model, "activation_checkpointing_disable", None)
            or model.gradient_checkpointing_disable
        )
        off()


# ---- measurement helpers -------------------------------------------------------------------------
class Meter:
    """Per-phase wall time and peak memory (GPU allocator peak, or process peak RSS on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, dict] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def _peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    @contextlib.contextmanager
    def phase(self, name: str, **extra):
        self._sync()
        self._reset_peak()
        start = time.perf_counter()
        record = dict(extra)
        yield record
        self._sync()
        record.update(seconds=round(time.perf_counter() - start, 3), peak_bytes=self._peak())
        self.phases[name] = record
        print(
            f"  {name:<18} {record['seconds']:>9.1f} s  peak {record['peak_bytes'] / 2**30:7.2f} GiB",
            flush=True,
        )


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s (the MFU denominator), square n x n operands."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    repeats = 20 if device.type == "cuda" else 5
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def random_split(rows: int, seq_len: int, vocab: int, seed: int) -> EncodedSplit:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq_len), generator=gen)
    labels = torch.randint(0, NUM_LABELS, (rows,), generator=gen)
    return EncodedSplit(ids, torch.ones_like(ids), labels)


# ---- the cascade ---------------------------------------------------------------------------------
def prune(
    model, adapter, granularity: str, criterion: str, ratio: float, batches: list, version: int
):
    request = EstimateRequest(granularity, criterion)
    scores, stats = estimate_locally(model, adapter, batches, request)
    units = max(1, round(ratio * total_units(model, adapter, granularity)))
    before = mm.model_shape(model).params
    common = dict(stage=granularity, criterion=criterion, version_in=version, params_before=before)
    if granularity == "layers":
        plan = plan_layer_removal(model, adapter, scores, Budget(units=units), **common)
    else:
        plan = plan_unit_removal(
            model, adapter, granularity, scores, Budget(units=units), stats=stats, **common
        )
    apply_plan(model, adapter, plan)
    return {
        "removed_units": plan.removed_units(),
        "params_before": before,
        "params_after": mm.model_shape(model).params,
    }


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    meter = Meter(device)
    shape_spec = choose_shape(args.params, args.arch, args.vocab)
    config = model_config(shape_spec, args.arch, max(args.seq_len, 512))
    print(
        f"scale benchmark: {args.arch} ~{args.params:.3g} params on {device} ({args.dtype})",
        flush=True,
    )
    with meter.phase("build") as rec:
        model = build_on_device(config, device, dtype)
        rec["params"] = mm.model_shape(model).params
    adapter = get_adapter(model)
    shape = mm.model_shape(model)
    print(f"  model: {shape.params / 1e9:.3f} B params, {shape_spec}", flush=True)
    rate = matmul_rate(device, dtype)
    cal = random_split(args.cal_samples, args.seq_len, args.vocab, seed=0)
    batches = list(cal.batches(args.cal_batch))
    train = random_split(
        max(64, args.recover_batch * args.recover_steps), args.seq_len, args.vocab, 1
    )
    with meter.phase("calibration", tokens=args.cal_samples * args.seq_len) as rec, torch.no_grad():
        for batch in batches:
            model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            )
    flops = len(batches) * mm.forward_flops(shape, args.cal_batch, args.seq_len)
    rec.update(
        model_flops=flops,
        matmul_flops_per_s=rate,
        mfu=flops / rec["seconds"] / rate,
        achieved_flops_per_s=flops / rec["seconds"],
    )
    checkpointing(model, True)
    settings = RecoverySettings(
        method="lora", steps=args.recover_steps, batch_size=args.recover_batch, lr=1e-4, lora_rank=8
    )
    objective = get_objective("classification")  # the random models' heads classify
    plan = [
        ("layers", "block_influence", args.layers_ratio),
        ("heads", args.heads_criterion, args.heads_ratio),
        ("channels", "wanda", args.channels_ratio),
    ]
    for version, (granularity, criterion, ratio) in enumerate(plan):
        with meter.phase(f"prune_{granularity}", criterion=criterion) as rec:
            rec.update(prune(model, adapter, granularity, criterion, ratio, batches, 2 * version))
        with meter.phase(f"recover_{granularity}", steps=args.recover_steps) as rec:
            model, metrics = recover(model, adapter, train, settings, objective)
            rec.update(first_loss=metrics["first_loss"], last_loss=metrics["last_loss"])
    checkpointing(model, False)
    out = Path(args.out or tempfile.mkdtemp(prefix="cascade-scale-")) / "checkpoint"
    with meter.phase("export", path=str(out)):
        save_checkpoint(model, None, out, metadata={"dense_params": shape.params})
    pruned_params = mm.model_shape(model).params
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    validation = None
    if args.validate_device:
        from runner.validate import validate_checkpoint

        with meter.phase("validate") as rec:
            validation = validate_checkpoint(
                out,
                args.validate_device,
                seq_len=args.seq_len,
                measure_device=args.device,
                repeats=3,
            )
            rec.update(fits=validation["fits"], peak_bytes_inference=validation["peak_bytes"])
    cascade_s = sum(p["seconds"] for k, p in meter.phases.items() if k not in ("build", "validate"))
    return {
        "arch": args.arch,
        "device": str(device),
        "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "shape": shape_spec,
        "dense_params": shape.params,
        "pruned_params": pruned_params,
        "calibration": {
            "samples": args.cal_samples,
            "seq_len": args.seq_len,
            "batch": args.cal_batch,
        },
        "cascade_seconds": round(cascade_s, 2),
        "peak_bytes": max(p["peak_bytes"] for p in meter.phases.values()),
        "calibration_mfu": meter.phases["calibration"]["mfu"],
        "phases": meter.phases,
        "validation": validation,
        "command": " ".join(sys.argv),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params", type=float, default=6.25e9)
    p.add_argument("--arch", choices=("mha_gelu", "gqa_swiglu"), default="gqa_swiglu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--cal-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--cal-batch", type=int, default=4)
    p.add_argument("--heads-criterion", default="taylor", choices=("taylor", "wanda"))
    p.add_argument("--layers-ratio", type=float, default=0.125)
    p.add_argument("--heads-ratio", type=float, default=0.25)
    p.add_argument("--channels-ratio", type=float, default=0.3)
    p.add_argument("--recover-steps", type=int, default=4)
    p.add_argument("--recover-batch", type=int, default=4)
    p.add_argument("--validate-device", default="dgx_spark", help="device profile ('' to skip)")
    p.add_argument("--out", help="directory for the exported checkpoint (default: a temp dir)")
    p.add_argument(
        "--json", default=None, help="result file (default benchmarks/results/scale_*.json)"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="plumbing check only: allow calibration below 64 x 512 tokens (figures meaningless)",
    )
    args = p.parse_args(argv)
    if args.cal_samples * args.seq_len < 64 * 512 and not args.smoke:
        p.error("calibration needs at least 64 x 512 tokens (or --smoke)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    path = Path(
        args.json
        or ROOT
        / "benchmarks"
        / "results"
        / f"scale_{args.arch}_{args.params:.3g}_{args.device}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(
        f"cascade {result['cascade_seconds']:.1f} s, peak {result['peak_bytes'] / 2**30:.2f} GiB, "
        f"calibration MFU {result['calibration_mfu']:.1%} -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
