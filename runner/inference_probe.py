"""The measured inference run of `cascade validate`, in a SEPARATE PROCESS.

`measure_inference` (the parent side) starts `python -m runner.inference_probe REF ...`, which
loads the checkpoint, runs forward passes over batch x seq_len random tokens (KV cache on for
decoders) and reports
  CPU:  peak RSS growth over the process's RSS before loading (VmHWM is reset after loading, so
        load-time copies do not count; weights + inference working set do), read after one
        warm-up load + forward has paid the runtime's one-off costs;
  CUDA: torch.cuda.max_memory_allocated under set_per_process_memory_fraction(budget / total),
        so exceeding the budget raises OOM, reported as does-not-fit;
and the median forward latency after warm-up. A fresh process keeps the caller's own memory out
of the figure.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from runner.models import load_model
from stages.arch import get_adapter
from stages.base import param_count
from stages.checkpoint import load_pruned, model_class

PROBE_TIMEOUT_S = 900


class ProbeError(RuntimeError):
    """The measuring subprocess failed for a reason other than running out of memory."""


# ---- measured run (parent side) -----------------------------------------------------------------
def measure_inference(
    ref: str | Path,
    *,
    batch: int,
    seq_len: int,
    dtype: str,
    device: str = "cpu",
    budget_bytes: int | None = None,
    warmup: int = 2,
    repeats: int = 5,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> dict:
    """Run the probe in a fresh interpreter; returns {peak_bytes, latency_ms, oom, device, ...}."""
    options = {
        "batch": batch,
        "seq-len": seq_len,
        "dtype": dtype,
        "device": device,
        "warmup": warmup,
        "repeats": repeats,
        "budget-bytes": budget_bytes,
    }
    cmd = [sys.executable, "-m", "runner.inference_probe", "--probe", str(ref)]
    cmd += [f"--{key}={value}" for key, value in options.items() if value is not None]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Tensors >= 1 MiB get their own mmap and go back to the OS when freed; with glibc's dynamic
    # threshold freed blocks stay in the heap and the RSS peak grows with every forward pass.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=root
        )
    except subprocess.TimeoutExpired:
        raise ProbeError(f"measuring {ref}: no result within {timeout_s:.0f}s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProbeError(f"measuring {ref}: probe exited with {done.returncode}: {tail}")
    return json.loads(lines[-1])


# ---- measured run (child side: python -m runner.inference_probe --probe REF ...) ----------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ProbeError(f"/proc/self/status has no {field}")


def _load_for_probe(ref: str, dtype, device: str):
    """A pruned checkpoint (load_pruned), a plain HF directory, or a built-in demo name.

    The caller verified a checkpoint's manifest before starting the probe."""
    config_file = Path(ref) / "config.json"
    if config_file.is_file() and "pruning" in json.loads(config_file.read_text()):
        return load_pruned(ref, device=device, dtype=dtype, verify=False)
    if config_file.is_file():
        config = AutoConfig.from_pretrained(ref)
        cls = (
            model_class(config, ref) if config.architectures else AutoModelForSequenceClassification
        )
        model = cls.from_pretrained(ref, dtype=dtype, use_safetensors=True)
    else:
        model, _ = load_model(ref, dtype=dtype, progress=False)
    return model.to(device).eval()


def _release_freed_memory() -> None:
    """Collect garbage and hand glibc's freed-but-kept pages back, so they are not counted."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(libc_name).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc: nothing kept to give back
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


def _random_inputs(model, batch: int, seq_len: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    vocab, pad = model.config.vocab_size, model.config.pad_token_id
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    if pad is not None:
        ids[ids == pad] = (pad + 1) % vocab
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if get_adapter(model).is_decoder:
        inputs["use_cache"] = True  # keep the KV cache as a generation prefill would
    return inputs


def _warm_cpu_runtime(ref: str, dtype) -> None:
    """Load and run the model once at 1 x 8 tokens, then drop it, before the baseline is read.

    The first forward pays the runtime's one-off costs: lazily imported modelling code, kernel
    code paged in from libtorch, the intra-op thread pool and its allocator arenas. They belong to
    the runtime like the imports already before the baseline, and how much of them lands in RSS
    varied by up to ~20 MiB between identical runs, which hid the model's own figure.
    """
    model = _load_for_probe(ref, dtype, "cpu")
    with torch.inference_mode():
        model(**_random_inputs(model, 1, 8, "cpu"))
    del model
    _release_freed_memory()


def _probe(args) -> dict:
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    if cuda and args.budget_bytes:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_bytes / total))
    if not cuda:
        _warm_cpu_runtime(args.ref, dtype)
    baseline = 0 if cuda else _rss_kib("VmRSS") * 1024
    try:
        model = _load_for_probe(args.ref, dtype, args.device)
        if not cuda:
            # reset VmHWM so load-time copies do not count, only weights + inference
            _release_freed_memory()
            Path("/proc/self/clear_refs").write_text("5")
        inputs = _random_inputs(model, args.batch, args.seq_len, args.device)
        times = []
        with torch.inference_mode():
            for i in range(args.warmup + args.repeats):
                start = time.perf_counter()
                model(**inputs)
                if cuda:
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append((time.perf_counter() - start) * 1000.0)
    except torch.OutOfMemoryError as exc:
        return {
            "oom": True,
            "peak_bytes": None,
            "latency_ms": None,
            "device": args.device,
            "error": str(exc).splitlines()[0],
        }
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024 - baseline
    return {
        "oom": False,
        "peak_bytes": int(peak),
        "latency_ms": statistics.median(times),
        "device": args.device,
        "params": param_count(model),
    }


def _probe_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.inference_probe")
    parser.add_argument("--probe", dest="ref", required=True, help="checkpoint dir or demo name")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget-bytes", type=int)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    print(json.dumps(_probe(parser.parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main())
