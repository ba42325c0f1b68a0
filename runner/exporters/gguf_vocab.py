"""The tokenizer.ggml.* fields of a GGUF file, built from a checkpoint's tokenizer.json.

Only GPT-2-style byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2, GPT-2) are written: llama.cpp
stores their vocabulary in byte-level form, the merges as "a b" strings, and picks its
pre-tokenizer regex by NAME (`tokenizer.ggml.pre`). llama.cpp's own converter finds that name by
hashing the token ids of a probe text against a table it regenerates per model; here the name is
read off the pre-tokenizer's structure instead, for the few shapes we can vouch for, and anything
else must be named explicitly (`--tokenizer-pre`) rather than guessed, because a wrong
pre-tokenizer silently tokenises text differently from transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
from tokenizers import Tokenizer

# pre-tokenizer regexes as they appear in tokenizer.json (tiktoken cl100k style)
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace("\\p{N}{1,3}", "\\p{N}")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


class VocabError(ValueError):
    """The tokenizer cannot be written as GGUF fields (message: cause, file, what to do)."""


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    pre: str
    add_bos: bool
    add_eos: bool


def _steps(pre_tokenizer: dict | None) -> list[dict]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return list(pre_tokenizer.get("pretokenizers") or [])
    return [pre_tokenizer]


def _split_regex(step: dict) -> str | None:
    if step.get("type") != "Split":
        return None
    pattern = step.get("pattern") or {}
    return pattern.get("Regex")


def detect_pre(tokenizer_json: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for the structures we recognise, else None."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = _split_regex(steps[0])
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if regex == _QWEN2_REGEX:
            return "qwen2"
    return None


def _check_byte_level_bpe(data: dict, path: Path) -> None:
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise VocabError(
            f"{path}: tokenizer model is {model.get('type')!r}; the gguf exporter writes byte-level "
            "BPE (GPT-2 style) tokenizers only"
        )
    if model.get("byte_fallback"):
        raise VocabError(
            f"{path}: SentencePiece-style BPE (byte_fallback); the gguf exporter writes byte-level "
            "BPE (GPT-2 style) tokenizers only - convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    steps = _steps(data.get("pre_tokenizer"))
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if not byte_level:
        raise VocabError(
            f"{path}: no ByteLevel pre-tokenizer; the gguf exporter writes byte-level BPE "
            "(GPT-2 style) tokenizers only"
        )
    if byte_level[0].get("add_prefix_space"):
        raise VocabError(
            f"{path}: ByteLevel add_prefix_space=true is not reproduced by llama.cpp's BPE "
            "tokenizer; set it to false in tokenizer.json if the model allows"
        )


def _adds(data: dict, token_id: int | None, first: bool) -> bool:
    """Whether encoding with special tokens puts `token_id` first (BOS) / last (EOS)."""
    if token_id is None:
        return False

    ids = Tokenizer.from_str(json.dumps(data)).encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0 if first else -1] == token_id


def build_vocab(
    checkpoint: Path,
    vocab_size: int,
    special_ids: dict[str, int],
    pre: str | None = None,
) -> GGUFVocab:
    """Tokens, token types, pre-tokenizer name and BOS/EOS behaviour for `vocab_size` rows."""
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise VocabError(
            f"{checkpoint}: no tokenizer.json; a GGUF file must carry its tokenizer - save the "
            "checkpoint with its (fast) tokenizer"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise VocabError(f"{path}: unreadable ({err})") from err
    _check_byte_level_bpe(data, path)
    name = pre or detect_pre(data)
    if name is None:
        raise VocabError(
            f"{path}: pre-tokenizer not recognised (known: gpt-2, smollm, llama-bpe, qwen2); pass "
            "--tokenizer-pre NAME with llama.cpp's name for it"
        )
    by_id: dict[int, str] = {int(i): tok for tok, i in (data["model"].get("vocab") or {}).items()}
    types = dict.fromkeys(by_id, TOKEN_NORMAL)
    for added in data.get("added_tokens") or []:
        token_id = int(added["id"])
        by_id[token_id] = added["content"]
        types[token_id] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    too_big = [i for i in by_id if i >= vocab_size]
    if too_big:
        raise VocabError(
            f"{path}: token id {max(too_big)} does not fit the model's {vocab_size} embedding rows; "
            "the tokenizer does not belong to this model"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, TOKEN_UNUSED) for i in range(vocab_size)]
    return GGUFVocab(
        tokens=tokens,
        token_types=token_types,
        pre=name,
        add_bos=_adds(data, special_ids.get("bos"), first=True),
        add_eos=_adds(data, special_ids.get("eos"), first=False),
    )


def add_vocab(writer, checkpoint: Path, vocab_size: int, pre: str | None = None) -> GGUFVocab:
    """Write every tokenizer.* field (merges, special ids, chat template via gguf.SpecialVocab)."""

    special = gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=vocab_size)
    vocab = build_vocab(checkpoint, vocab_size, special.special_token_ids, pre)
    if not special.merges:
        raise VocabError(f"{checkpoint / 'tokenizer.json'}: BPE tokenizer without merges")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    special.add_special_token = {"bos": vocab.add_bos, "eos": vocab.add_eos}
    special.add_to_gguf(writer, quiet=True)
    return vocab
