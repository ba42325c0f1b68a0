"""Which dtype recovery's matmuls run in: bf16 autocast only where this machine computes it fast.

CPUs of one cloud "kind" differ (docs/PERFORMANCE.md): one VM had AMX (bf16 matmuls ~4x fp32),
another AVX-512 with avx512_bf16, a third ran bf16 at a sixth of fp32. So `auto` asks twice: does
the CPU say it has native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo), and is a bf16 matmul
measured here at least BF16_GAIN times as fast as fp32? Only then bf16. On CUDA: bf16 when the
GPU supports it. The decision and its reason are kept once per process and device.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_GAIN = 1.3  # a measured gain below this does not pay for bf16's rounding
PROBE_SIZE = 1024


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def matmul_gflops(dtype: torch.dtype, device: str = "cpu", n: int = PROBE_SIZE, seconds=0.3):
    """Measured GFLOP/s of an n x n matmul in `dtype` (best of short repeated runs)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best, end = float("inf"), time.perf_counter() + seconds
    for _ in range(2):
        a @ b  # warm-up: kernel selection, AMX tile configuration
    while True:
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > end:
            break
    return 2 * n**3 / best / 1e9


@functools.cache
def bf16_decision(device_type: str) -> tuple[bool, str]:
    """(use bf16 autocast, why) for `precision: auto` on this machine."""
    if device_type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "the GPU supports bf16" if ok else "the GPU has no bf16"
    if device_type != "cpu":
        return False, f"no bf16 probe for {device_type}"
    native = sorted(set(BF16_FLAGS) & cpu_flags())
    if not native:
        return False, "the CPU reports neither avx512_bf16 nor amx_bf16"
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    why = f"{'/'.join(native)}; matmul {bf16:.0f} GFLOP/s bf16 vs {fp32:.0f} fp32"
    return bf16 >= BF16_GAIN * fp32, why


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 when asked for (or `auto` finds it pays), None for plain fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and bf16_decision(device.type)[0]:
        return torch.bfloat16
    return None
