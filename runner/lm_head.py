"""Perplexity on a local text file: the source checkpoint's LM head + the file's token ids.

Only the head's tensors are read from the checkpoint (safetensors, by name), never a second copy
of the model. A head tied to the input embeddings is read from the model being measured, so a
recovery that changed the embeddings is measured as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import Tensor

from runner.data.text_files import split_at_whitespace
from runner.errors import JobError
from runner.models import check_safetensors, read_config_json
from stages.checkpoint import build_on_meta, saved_layouts, tied_pairs
from stages.lm_eval import perplexity

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class LMHead:
    """weight None = tied to the measured model's input embeddings."""

    weight: Tensor | None
    bias: Tensor | None = None

    def bind(self, model):
        """hidden -> logits for `model` (the head moved to its device and dtype once)."""
        embeddings = model.get_input_embeddings().weight
        weight = self.weight if self.weight is not None else embeddings
        weight = weight.to(embeddings.device, embeddings.dtype)
        bias = self.bias.to(embeddings.device, embeddings.dtype) if self.bias is not None else None

        def head(hidden: Tensor) -> Tensor:
            logits = hidden @ weight.T
            return logits + bias if bias is not None else logits

        return head


def _causal_class(path: Path, ref: str):
    raw = read_config_json(path)
    names = raw.get("architectures") or []
    names = names if isinstance(names, list) else []
    causal = [n for n in names if isinstance(n, str) and n.endswith(CAUSAL_SUFFIXES)]
    cls = getattr(transformers, causal[0], None) if causal else None
    if cls is None:
        raise JobError(
            f"evaluation.perplexity_file: model {ref!r} is not a causal-LM checkpoint "
            f"(config.json architectures {names} has no *ForCausalLM / *LMHeadModel), so it has "
            "no language-model head to measure perplexity with"
        )
    return cls


def _read_tensors(path: Path, names: list[str]) -> dict[str, Tensor]:
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        files = {name: weight_map.get(name) for name in names}
    else:
        files = {name: SINGLE for name in names}
    out = {}
    for name, filename in files.items():
        if filename is None or not (path / filename).is_file():
            continue
        with safe_open(str(path / filename), framework="pt", device="cpu") as handle:
            if name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


def load_lm_head(path: Path, ref: str) -> LMHead:
    """The output-embedding tensors of a local causal-LM checkpoint (or None when tied)."""
    cls = _causal_class(path, ref)
    check_safetensors(path)
    config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    lm = build_on_meta(config, cls=cls, layouts=saved_layouts(config))
    out = lm.get_output_embeddings()
    names = {id(p): n for n, p in lm.named_parameters(remove_duplicate=False)}
    wanted = [names[id(out.weight)]] + ([names[id(out.bias)]] if out.bias is not None else [])
    if out.weight is lm.get_input_embeddings().weight or wanted[0] in tied_pairs(lm):
        return LMHead(weight=None)
    found = _read_tensors(path, wanted)
    if wanted[0] not in found:
        raise JobError(
            f"evaluation.perplexity_file: {path} has no weights for its LM head ({wanted[0]}) in "
            "its safetensors files (only safetensors checkpoints are read)"
        )
    bias = found.get(wanted[1]) if len(wanted) > 1 else None
    return LMHead(weight=found[wanted[0]].float(), bias=bias.float() if bias is not None else None)


CHUNK_CHARS = 1 << 16  # characters tokenised at a time


def token_ids_from(handle, tokenizer, max_tokens: int) -> list[int]:
    """The first `max_tokens` ids of a text stream (no special tokens), read chunk by chunk:
    memory and characters read grow with max_tokens, not with the size of the file."""
    ids: list[int] = []
    carry = ""
    while len(ids) < max_tokens:
        chunk = handle.read(CHUNK_CHARS)
        text = carry + chunk
        if not text:
            break
        head, carry = split_at_whitespace(text) if chunk else (text, "")
        ids += tokenizer(head, add_special_tokens=False)["input_ids"]
    return ids[:max_tokens]


def read_token_ids(file: Path, tokenizer, max_tokens: int) -> Tensor:
    """The file as one token stream (no special tokens), capped at max_tokens; only the text
    those tokens need is read and tokenised (a huge single-line file costs no more)."""
    try:
        with open(file, encoding="utf-8") as handle:
            ids = token_ids_from(handle, tokenizer, max_tokens)
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(
            f"evaluation.perplexity_file: cannot read {file} as UTF-8 text ({exc})"
        ) from None
    if len(ids) < 2:
        raise JobError(f"evaluation.perplexity_file: {file} has fewer than 2 tokens")
    return torch.tensor(ids, dtype=torch.long)


class PerplexityProbe:
    """Everything needed to measure one model family member on one file, prepared once."""

    def __init__(self, evaluation, source: Path, ref: str, tokenizer, model):
        self.file = Path(evaluation.perplexity_file).expanduser()
        self.window = evaluation.perplexity_window
        positions = _max_positions(model.config)
        if positions is not None and self.window > positions:
            raise JobError(
                f"evaluation.perplexity_window: {self.window} tokens exceed model {ref!r}'s "
                f"{positions} positions"
            )
        self.head = load_lm_head(source, ref)
        self.bos = tokenizer.bos_token_id
        self.ids = read_token_ids(self.file, tokenizer, evaluation.perplexity_max_tokens)

    def measure(self, model) -> dict:
        head = self.head.bind(model)
        result = perplexity(model, head, self.ids, window=self.window, bos=self.bos)
        return result | {"file": str(self.file), "window": self.window}


def _max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
