"""Real text for causal-LM jobs: `data.sources` (local files or built-in corpora) -> packed blocks.

Each source is one DOMAIN. Its documents are split into train/validation/test BY DOCUMENT, per
domain, from the seed and the fractions (a document never lands in two splits; exact duplicates
inside a domain are dropped first, or a repeated paragraph would sit on both sides). Built-in
bearing notes keep runner.data.bearing's own split, so held-out notes never reach calibration or
recovery.

Tokens and blocks. Every document is tokenised without special tokens and followed by EOS (the
GPT-2 convention: EOS marks where one document ends, so packing several into one block never asks
the model to continue one text with another unannounced). A domain's split is one token stream cut
into `max_length` blocks. If the tokenizer has a BOS different from its EOS (Llama family), every
block starts with BOS, as every training sequence of such models did and as stages/lm_eval's
perplexity windows do; otherwise (GPT-2: BOS == EOS) blocks are plain slices of the stream. The
last block of a stream is right-padded (attention_mask 0, labels -100) rather than dropped, so
small test sets keep all their tokens. labels = input_ids: the model shifts them for next-token
loss. A tokenizer with no EOS gets no separator.

Calibration draws `calibration_blocks` blocks from the domains' TRAIN blocks, each domain's count
proportional to its weight (largest-remainder rounding), sampled without replacement from the
seed: the multi-domain calibration of iterative structured pruning papers, so importance scores
reflect every domain the pruned model must keep, not the largest one.
"""

from __future__ import annotations

import hashlib
import zlib
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from runner.data.corpora import BUILTIN_CORPORA, Document, builtin_documents
from runner.data.text_files import (
    MAX_DOCUMENT_BYTES,
    TextDataError,
    open_source,
    resolve_source,
    split_at_whitespace,
)

__all__ = [
    "Document",
    "PackedBlocks",
    "TextDataError",
    "TextSource",
    "TextSplits",
    "build_text_splits",
    "pack_tokens",
    "proportional_counts",
]

BUILTIN_PREFIX = "builtin:"
SPLITS = ("train", "validation", "test")
_TOKENIZE_CHARS = 1 << 20  # documents are tokenised in batches of about this many characters
# a longer document is tokenised in pieces of at most this many characters, cut at whitespace:
# one 50 MB line tokenised in one call peaked at 5.4 GB (the tokenizer's per-token records)
_PIECE_CHARS = 1 << 16


class TextSource(BaseModel, extra="forbid"):
    """One `data.sources` entry (one domain).

    path: a file, a folder (every file with a known extension below it, or an Arrow folder written
      by `Dataset.save_to_disk`), or a glob (`**` allowed); `~` expanded; a relative path is read
      from build_text_splits' base_dir (the job file's folder), else the working directory. Or a built-in corpus: builtin:stdlib_docs, builtin:bearing_notes,
      builtin:bearing_qa (runner.data.corpora).
    format: auto = from the extension (.txt/.md/.rst text, .jsonl/.ndjson, .json, .csv, .parquet,
      .arrow); a folder holding dataset_info.json / state.json is an Arrow folder.
    field: the column holding the text (jsonl/json/csv/parquet/arrow).
    split_by: what one document of plain text is: a whole file, or a blank-line separated
      paragraph. Documents are the unit the train/validation/test split assigns.
    weight: this domain's share of the calibration set, relative to the other sources.
    domain: name in reports and per-domain perplexity; default from the path (file stem, folder
      name, the last fixed folder of a glob, the built-in corpus name). Must be unique.
    """

    path: str = Field(min_length=1)
    format: Literal["auto", "text", "jsonl", "json", "csv", "parquet", "arrow"] = "auto"
    field: str = Field("text", min_length=1)
    split_by: Literal["file", "paragraph"] = "paragraph"
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    domain: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value  # `- notes.txt` in YAML

    @field_validator("path")
    @classmethod
    def _known_builtin(cls, path: str) -> str:
        if path.startswith(BUILTIN_PREFIX) and path[len(BUILTIN_PREFIX) :] not in BUILTIN_CORPORA:
            available = ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_CORPORA)
            raise ValueError(f"unknown built-in corpus {path!r}; available: {available}")
        return path

    @property
    def builtin(self) -> str | None:
        return self.path[len(BUILTIN_PREFIX) :] if self.path.startswith(BUILTIN_PREFIX) else None

    def domain_name(self) -> str:
        if self.domain:
            return self.domain
        if self.builtin:
            return self.builtin
        path = Path(self.path.rstrip("/\\")).expanduser()
        fixed = [part for part in path.parts if not any(c in part for c in "*?[")]
        if len(fixed) < len(path.parts):  # a glob: name it after its last fixed folder
            return fixed[-1] if fixed else "text"
        return path.stem or path.name


@dataclass(frozen=True)
class PackedBlocks:
    """Fixed-length token blocks: input_ids / attention_mask [n, L] (int64), domain_ids [n]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    domain_ids: torch.Tensor
    domains: tuple[str, ...]

    @property
    def labels(self) -> torch.Tensor:
        """input_ids with -100 on padding: the next-token targets (the model shifts them)."""
        return self.input_ids.masked_fill(self.attention_mask == 0, -100)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, index: Sequence[int] | torch.Tensor) -> PackedBlocks:
        index = torch.as_tensor(index, dtype=torch.long)
        return PackedBlocks(
            self.input_ids[index], self.attention_mask[index], self.domain_ids[index], self.domains
        )

    def of_domain(self, domain: str) -> PackedBlocks:
        keep = self.domain_ids == self.domains.index(domain)
        return self.select(torch.nonzero(keep).flatten())

    @staticmethod
    def concat(parts: Sequence[PackedBlocks], domains: tuple[str, ...], length: int):
        if not parts:
            empty = torch.zeros(0, length, dtype=torch.long)
            return PackedBlocks(empty, empty.clone(), torch.zeros(0, dtype=torch.long), domains)
        return PackedBlocks(
            torch.cat([p.input_ids for p in parts]),
            torch.cat([p.attention_mask for p in parts]),
            torch.cat([p.domain_ids for p in parts]),
            domains,
        )


@dataclass
class TextSplits:
    """Everything a causal-LM job reads from its text sources.

    test_by_domain: per-domain perplexity; test_documents: the raw held-out test documents per
    domain (cloze and bearing-QA tasks are built from these, never from train); stats: per-domain
    documents / tokens / blocks per split, duplicates dropped, calibration share (JSON-able).
    """

    domains: tuple[str, ...]
    max_length: int
    train: PackedBlocks
    validation: PackedBlocks
    test: PackedBlocks
    calibration: PackedBlocks
    test_by_domain: dict[str, PackedBlocks]
    test_documents: dict[str, list[Document]]
    stats: dict[str, dict] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def proportional_counts(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` by weight, largest remainder first (ties to the earlier entry); exact."""
    shares = [Fraction(w) for w in weights]
    raw = [total * s / sum(shares) for s in shares]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def pack_tokens(
    stream: np.ndarray, max_length: int, *, bos: int | None, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token stream into [n, max_length] blocks (BOS first in each when `bos` is given);
    the last partial block is right-padded with pad_id (mask 0), or dropped if it would predict
    nothing (fewer than 2 real tokens)."""
    stream = np.asarray(stream, dtype=np.int64)
    step = max_length - (bos is not None)
    full = stream.size // step
    rows = [stream[: full * step].reshape(full, step)]
    tail = stream[full * step :]
    lengths = [max_length] * full
    if tail.size and tail.size + (bos is not None) >= 2:
        rows.append(np.concatenate([tail, np.full(step - tail.size, pad_id)])[None])
        lengths.append(tail.size + (bos is not None))
    body = np.concatenate(rows)
    if bos is not None:
        body = np.concatenate([np.full((body.shape[0], 1), bos), body], axis=1)
    ids = torch.from_numpy(body.astype(np.int64))
    mask = (torch.arange(max_length)[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _assign_splits(n: int, domain: str, seed: int, fractions: tuple[float, float]) -> np.ndarray:
    """0/1/2 (train/validation/test) per document: a seeded permutation, test first, then
    validation; each non-zero fraction gets at least one document and train keeps one."""
    n_val_f, n_test_f = fractions
    n_test = min(max(1, round(n_test_f * n)), n - 1) if n_test_f > 0 else 0
    n_val = min(max(1, round(n_val_f * n)), n - n_test - 1) if n_val_f > 0 else 0
    order = np.random.default_rng([seed, zlib.crc32(domain.encode())]).permutation(n)
    codes = np.zeros(n, dtype=np.int8)
    codes[order[:n_test]] = 2
    codes[order[n_test : n_test + n_val]] = 1
    return codes


class _Tokens:
    """Token ids of one domain's splits, gathered document by document (EOS after each)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
        self._batch: list[tuple[str, str]] = []
        self._chars = 0

    def add(self, text: str, split: str) -> None:
        if len(text) > _PIECE_CHARS:
            self.flush()  # documents keep their order
            self.parts[split].append(self._in_pieces(text))
            return
        self._batch.append((text, split))
        self._chars += len(text)
        if self._chars >= _TOKENIZE_CHARS or len(self._batch) >= 256:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        texts = [text for text, _ in self._batch]
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        tail = [] if self.eos is None else [self.eos]
        for ids, (_, split) in zip(encoded, self._batch):
            self.parts[split].append(np.asarray(list(ids) + tail, dtype=np.int32))  # 4 B/token
        self._batch, self._chars = [], 0

    def _in_pieces(self, text: str) -> np.ndarray:
        """One long document's ids, tokenised piece by piece (memory bounded by the piece)."""
        ids, start = [], 0
        while start < len(text):
            window = text[start : start + _PIECE_CHARS]
            head = split_at_whitespace(window)[0] if start + len(window) < len(text) else window
            encoded = self.tokenizer(head, add_special_tokens=False, verbose=False)["input_ids"]
            ids.append(np.asarray(encoded, dtype=np.int32))
            start += len(head)
        if self.eos is not None:
            ids.append(np.asarray([self.eos], dtype=np.int32))
        return np.concatenate(ids)

    def stream(self, split: str) -> np.ndarray:
        parts = self.parts[split]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ----------------------------------------------------------------------------- one domain


@contextmanager
def _domain_documents(
    source: TextSource, where: str, data_cfg: Any, base_dir, limit: int
) -> Iterator[tuple[Any, list[Document] | None]]:
    """(iterate texts, the built-in corpus's Documents or None) while the source is open."""
    if source.builtin:
        documents = builtin_documents(source.builtin, data_cfg)
        yield (lambda: (d.text for d in documents)), documents
        return
    with open_source(source, where, base_dir=base_dir, limit=limit) as iterate:
        yield iterate, None


def document_split_codes(
    texts: Iterable[str], fixed, domain: str, seed: int, fractions, where: str, describe: str
) -> np.ndarray:
    """Each document's split as an index into SPLITS, -1 for a repeat of an earlier document
    (dropped): drawn from the seed, or the corpus's own where it fixes them (`fixed` Documents).
    The one place a domain's documents get their split (benchmarks/per_document.py reads it)."""
    digests = array("Q", (_digest(text) for text in texts))
    if not digests:
        raise TextDataError(
            f"{where}: {describe} holds no documents (empty, blank, or every value empty); "
            "put text in it or remove the source"
        )
    _, first = np.unique(np.frombuffer(digests, dtype=np.uint64), return_index=True)
    keep = np.zeros(len(digests), dtype=bool)
    keep[first] = True
    if fixed is None or all(d.split is None for d in fixed):
        needed = 1 + sum(f > 0 for f in fractions)
        if keep.sum() < needed:
            raise TextDataError(
                f"{where}: {describe} has {int(keep.sum())} distinct document(s), too few to "
                f"split into train/validation/test by document (needs {needed}); use "
                "split_by: paragraph, add documents, or set the validation/test fractions to 0"
            )
        codes = np.full(len(digests), -1, dtype=np.int8)
        codes[keep] = _assign_splits(int(keep.sum()), domain, seed, fractions)
    else:
        codes = np.array([SPLITS.index(d.split or "train") for d in fixed], dtype=np.int8)
        codes[~keep] = -1
    return codes


def _split_domain(iterate, fixed, domain, where, describe, tokenizer, seed, fractions):
    """Two passes over one domain: count and de-duplicate, then tokenise by assigned split."""
    codes = document_split_codes(iterate(), fixed, domain, seed, fractions, where, describe)
    tokens = _Tokens(tokenizer)
    test_documents = []
    for index, text in enumerate(iterate()):
        if index >= len(codes):
            raise TextDataError(f"{where}: {describe} changed while it was read; run again")
        if codes[index] < 0:
            continue
        split = SPLITS[codes[index]]
        tokens.add(text, split)
        if split == "test":
            doc = fixed[index] if fixed else Document(text)
            test_documents.append(replace(doc, split="test"))
    tokens.flush()
    counts = {name: int((codes == i).sum()) for i, name in enumerate(SPLITS)}
    return tokens, test_documents, counts, int((codes < 0).sum())


# ----------------------------------------------------------------------------- all domains


def _validated(sources, where: str) -> list[TextSource]:
    if not sources:
        raise TextDataError(f"{where}: no sources; list at least one file or builtin corpus")
    checked = []
    for i, source in enumerate(sources):
        try:
            checked.append(TextSource.model_validate(source))
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            loc = "".join(f".{part}" for part in first["loc"])
            raise TextDataError(f"{where}.{i}{loc}: {first['msg']}") from None
    seen: dict[str, int] = {}
    for i, source in enumerate(checked):
        name = source.domain_name()
        if name in seen:
            raise TextDataError(
                f"{where}.{i}: domain {name!r} is also {where}.{seen[name]}'s; give one of "
                "them another `domain:` (or merge them into one glob)"
            )
        seen[name] = i
    return checked


def build_text_splits(
    sources: Sequence[TextSource | Mapping],
    tokenizer,
    max_length: int,
    *,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    calibration_blocks: int = 64,
    calibration_batch_size: int = 8,
    data_cfg_for_bearing: Any = None,
    base_dir: str | Path | None = None,
    max_document_bytes: int = MAX_DOCUMENT_BYTES,
    where: str = "data.sources",
) -> TextSplits:
    """Read, split, tokenise and pack every source; draw the weighted calibration set.

    `data_cfg_for_bearing` is the job's runner.data.bearing.DataConfig for the bearing corpora
    (its text_style is forced to "sentences"); None = runner.data.bearing defaults. Raises
    TextDataError.
    """
    checked = _validated(sources, where)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    bos = bos if bos is not None and bos != eos else None
    if max_length < 2 + (bos is not None):
        raise TextDataError(f"max_length {max_length} is too short to predict a token")
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1) or (
        validation_fraction + test_fraction >= 1
    ):
        raise TextDataError(
            f"validation_fraction {validation_fraction} and test_fraction {test_fraction} must "
            "each be in [0, 1) with a sum below 1"
        )
    for i, source in enumerate(checked):  # every path problem before any slow tokenising
        if not source.builtin:
            resolve_source(source, f"{where}.{i}", base_dir)
    pad_id = next(i for i in (tokenizer.pad_token_id, eos, 0) if i is not None)
    domains = tuple(source.domain_name() for source in checked)
    blocks: dict[str, dict[str, PackedBlocks]] = {}
    test_documents: dict[str, list[Document]] = {}
    stats: dict[str, dict] = {}
    for i, (source, domain) in enumerate(zip(checked, domains)):
        here = f"{where}.{i}"
        with _domain_documents(
            source, here, data_cfg_for_bearing, base_dir, max_document_bytes
        ) as (iterate, fixed):
            tokens, tests, counts, dropped = _split_domain(
                iterate, fixed, domain, here, source.path, tokenizer, seed,
                (validation_fraction, test_fraction),
            )  # fmt: skip
        blocks[domain] = {}
        for split in SPLITS:
            ids, mask = pack_tokens(tokens.stream(split), max_length, bos=bos, pad_id=pad_id)
            domain_ids = torch.full((ids.shape[0],), i, dtype=torch.long)
            blocks[domain][split] = PackedBlocks(ids, mask, domain_ids, domains)
        test_documents[domain] = tests
        stats[domain] = {
            "source": source.path,
            "weight": source.weight,
            "documents": counts,
            "duplicates_dropped": dropped,
            "tokens": {s: int(tokens.stream(s).size) for s in SPLITS},
            "blocks": {s: len(blocks[domain][s]) for s in SPLITS},
        }
    calibration = _calibration(
        checked, domains, blocks, stats, max_length, seed, calibration_blocks,
        calibration_batch_size, where,
    )  # fmt: skip
    join = {
        split: PackedBlocks.concat([blocks[d][split] for d in domains], domains, max_length)
        for split in SPLITS
    }
    return TextSplits(
        domains=domains,
        max_length=max_length,
        train=join["train"],
        validation=join["validation"],
        test=join["test"],
        calibration=calibration,
        test_by_domain={d: blocks[d]["test"] for d in domains},
        test_documents=test_documents,
        stats=stats,
    )


def _calibration(checked, domains, blocks, stats, length, seed, n_blocks, batch_size, where):
    """n_blocks train blocks, per domain by weight, sampled from the seed, then interleaved."""
    if n_blocks < 1 or batch_size < 1:
        raise TextDataError(
            f"calibration needs at least one block and a batch size >= 1 (got {n_blocks} blocks, "
            f"batch size {batch_size})"
        )
    total = sum(stats[d]["tokens"]["train"] for d in domains)
    needed = batch_size * length
    if total < needed:
        raise TextDataError(
            f"{where}: {total:,} train tokens in all, fewer than one calibration batch of "
            f"{batch_size} x {length} = {needed:,} tokens; add text or lower the calibration "
            "batch size or max_length"
        )
    quotas = proportional_counts(n_blocks, [source.weight for source in checked])
    parts = []
    for i, (domain, quota) in enumerate(zip(domains, quotas)):
        train = blocks[domain]["train"]
        stats[domain]["calibration_blocks"] = quota
        if quota > len(train):
            raise TextDataError(
                f"{where}.{i}: domain {domain!r} has {stats[domain]['tokens']['train']:,} train "
                f"tokens ({len(train)} blocks of {length}); its calibration share by weight is "
                f"{quota} blocks ({quota * length:,} tokens); add text, lower its weight or "
                "the number of calibration blocks"
            )
        rng = np.random.default_rng([seed, 1, zlib.crc32(domain.encode())])
        parts.append(train.select(np.sort(rng.choice(len(train), quota, replace=False))))
    joined = PackedBlocks.concat(parts, domains, length)
    order = np.random.default_rng([seed, 2]).permutation(len(joined))
    return joined.select(order)
