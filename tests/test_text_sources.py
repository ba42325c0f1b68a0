"""Text sources for causal-LM jobs: reading, one-line errors, document splits, packing, calibration.

Documents are made of words w0..w299 of a word-level tokenizer, so token counts are exact and a
document's first word can mark it: "no document in two splits" is checked on those markers.
"""

from __future__ import annotations

import json
import logging
import socket
import sys

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from runner.data import corpora, text_sources
from runner.data.bearing import DataConfig, build_dataset
from runner.data.corpora import clean_pydoc, stdlib_documents
from runner.data.text_sources import (
    TextDataError,
    TextSource,
    build_text_splits,
    pack_tokens,
    proportional_counts,
)

WORDS = 300
PAD, BOS, EOS = 0, 1, 2


def word_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """<pad>=0 <s>=1 </s>=2 <unk>=3, then wN -> N + 4. bos=False: GPT-2 style (no distinct BOS)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", **special
    )


def doc(marker: int, length: int = 12) -> str:
    """A document whose first word w<marker> identifies it; the rest are common words."""
    return " ".join([f"w{marker}"] + [f"w{(marker + k) % 50}" for k in range(1, length)])


def marker_ids(blocks) -> set[int]:
    ids = blocks.input_ids[blocks.attention_mask.bool()]
    return {int(i) - 4 for i in ids.unique() if int(i) - 4 >= 100}


def write_paragraphs(path, markers, length=12):
    path.write_text("\n\n".join(doc(m, length) for m in markers) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Any connection other than to localhost fails the test: sources must read local files only."""
    real = socket.socket.connect

    def guarded(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"network access to {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def build(sources, tokenizer=None, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("calibration_blocks", 4)
    kw.setdefault("calibration_batch_size", 2)
    return build_text_splits(sources, tokenizer or word_tokenizer(), kw.pop("max_length", 16), **kw)


def error_of(sources, **kw) -> str:
    with pytest.raises(TextDataError) as info:
        build(sources, **kw)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


# ----------------------------------------------------------------------------- splits


def test_documents_split_disjoint_complete_and_seeded(tmp_path):
    path = write_paragraphs(tmp_path / "notes.txt", range(100, 160))
    a = build([{"path": str(path)}], validation_fraction=0.2, test_fraction=0.2)
    train, val, test = (marker_ids(x) for x in (a.train, a.validation, a.test))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(100, 160))
    assert a.stats["notes"]["documents"] == {"train": 36, "validation": 12, "test": 12}
    assert {int(d.text.split()[0][1:]) for d in a.test_documents["notes"]} == test
    b = build([{"path": str(path)}], validation_fraction=0.2, test_fraction=0.2)
    assert torch.equal(a.train.input_ids, b.train.input_ids)
    assert torch.equal(a.calibration.input_ids, b.calibration.input_ids)
    c = build([{"path": str(path)}], validation_fraction=0.2, test_fraction=0.2, seed=1)
    assert marker_ids(c.test) != test


def test_exact_duplicates_are_dropped_before_splitting(tmp_path):
    texts = [doc(m) for m in range(100, 130)] + [doc(200)] * 6
    (tmp_path / "dup.txt").write_text("\n\n".join(texts), encoding="utf-8")
    splits = build([{"path": str(tmp_path / "dup.txt")}], test_fraction=0.3)
    assert splits.stats["dup"]["duplicates_dropped"] == 5
    holders = [
        name for name in ("train", "validation", "test") if 200 in marker_ids(getattr(splits, name))
    ]
    assert len(holders) == 1


def test_split_by_file_one_document_per_file(tmp_path):
    for m in range(100, 110):
        (tmp_path / f"{m}.txt").write_text(f"{doc(m)}\n\n{doc(m + 50)}\n", encoding="utf-8")
    splits = build([{"path": str(tmp_path / "*.txt"), "split_by": "file", "domain": "files"}])
    assert sum(splits.stats["files"]["documents"].values()) == 10
    for name in ("train", "validation", "test"):  # a file's two paragraphs stay together
        markers = marker_ids(getattr(splits, name))
        assert {m + 50 for m in markers if m < 150} <= markers


# ----------------------------------------------------------------------------- packing


def test_pack_tokens_bos_first_and_padded_tail():
    ids, mask = pack_tokens(np.arange(10, 20), 4, bos=BOS, pad_id=PAD)
    assert ids.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18], [1, 19, 0, 0]]
    assert mask.tolist()[-1] == [1, 1, 0, 0] and mask[:3].all()
    ids, mask = pack_tokens(np.arange(10, 19), 4, bos=None, pad_id=PAD)
    assert ids.tolist() == [[10, 11, 12, 13], [14, 15, 16, 17]]  # a 1-token tail predicts nothing


def test_blocks_shapes_eos_between_documents_and_labels(tmp_path):
    path = write_paragraphs(tmp_path / "a.txt", range(100, 130), length=7)
    splits = build([{"path": str(path)}], max_length=16)
    blocks = splits.train
    assert blocks.input_ids.shape[1] == 16 and blocks.input_ids.shape == blocks.attention_mask.shape
    assert (blocks.input_ids[:, 0] == BOS).all()  # a distinct BOS opens every block
    assert splits.stats["a"]["tokens"]["train"] == 8 * splits.stats["a"]["documents"]["train"]
    stream = blocks.input_ids[:, 1:][blocks.attention_mask[:, 1:].bool()]
    assert int((stream == EOS).sum()) == splits.stats["a"]["documents"]["train"]
    assert (blocks.labels[blocks.attention_mask == 0] == -100).all()
    assert torch.equal(
        blocks.labels[blocks.attention_mask == 1], blocks.input_ids[blocks.attention_mask == 1]
    )
    gpt2_like = build([{"path": str(path)}], tokenizer=word_tokenizer(bos=False), max_length=16)
    assert not (gpt2_like.train.input_ids[:, 0] == BOS).all()
    assert gpt2_like.train.tokens == splits.stats["a"]["tokens"]["train"]


# ----------------------------------------------------------------------------- calibration


def test_proportional_counts_largest_remainder():
    assert proportional_counts(10, [1, 2, 3]) == [2, 3, 5]
    assert proportional_counts(10, [3, 2, 1]) == [5, 3, 2]  # 5, 3.33, 1.67: the .67 gets it
    assert proportional_counts(7, [1, 1, 1]) == [3, 2, 2]  # ties go to the earlier source
    assert sum(proportional_counts(64, [0.3, 0.7, 1e-3])) == 64


def test_calibration_by_weight_from_train_blocks_only(tmp_path):
    sources = []
    for k, weight in enumerate((1.0, 2.0, 3.0)):
        path = write_paragraphs(tmp_path / f"d{k}.txt", range(100 + 60 * k, 150 + 60 * k), 20)
        sources.append({"path": str(path), "weight": weight})
    splits = build(sources, calibration_blocks=10, calibration_batch_size=4)
    assert torch.bincount(splits.calibration.domain_ids, minlength=3).tolist() == [2, 3, 5]
    train_rows = {tuple(row) for row in splits.train.input_ids.tolist()}
    other_rows = {
        tuple(r) for r in torch.cat([splits.validation.input_ids, splits.test.input_ids]).tolist()
    }
    for row in splits.calibration.input_ids.tolist():
        assert tuple(row) in train_rows and tuple(row) not in other_rows
    for name in splits.domains:  # each domain's calibration blocks are that domain's train blocks
        own = {tuple(r) for r in splits.train.of_domain(name).input_ids.tolist()}
        assert {tuple(r) for r in splits.calibration.of_domain(name).input_ids.tolist()} <= own
    assert set(splits.test_by_domain) == {"d0", "d1", "d2"}
    assert sum(len(b) for b in splits.test_by_domain.values()) == len(splits.test)


# ----------------------------------------------------------------------------- formats


@pytest.mark.usefixtures("no_network")
def test_jsonl_csv_parquet_arrow_sources_read_the_same_documents(tmp_path):
    texts = [doc(m) for m in range(100, 120)]
    rows = [{"body": t, "id": i} for i, t in enumerate(texts)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    table = datasets.Dataset.from_list(rows)
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "arrow_folder"))
    names = ["d.jsonl", "d.csv", "d.parquet", "arrow_folder"]
    sources = [{"path": str(tmp_path / n), "field": "body", "domain": n} for n in names]
    splits = build(sources, calibration_blocks=8)
    for name in names:
        assert sum(splits.stats[name]["documents"].values()) == 20
        assert splits.stats[name]["tokens"] == splits.stats["d.jsonl"]["tokens"]
    assert TextSource(path=str(tmp_path / "arrow_folder")).domain_name() == "arrow_folder"


# ----------------------------------------------------------------------------- errors


def test_missing_file_and_empty_glob(tmp_path):
    assert "file not found" in error_of([{"path": str(tmp_path / "nope.txt")}])
    good = write_paragraphs(tmp_path / "a.txt", range(100, 140))
    message = error_of([{"path": str(good)}, {"path": str(tmp_path / "*.jsonl")}])
    assert message.startswith("data.sources.1.path: glob") and "matched no files" in message


def test_empty_file_and_too_few_documents(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    message = error_of([{"path": str(tmp_path / "empty.txt")}])
    assert "data.sources.0" in message and "holds no documents" in message
    write_paragraphs(tmp_path / "two.txt", [100, 101])
    assert "too few to split" in error_of([{"path": str(tmp_path / "two.txt")}])


def test_wrong_field_names_the_columns(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "w1 w2", "title": "w3"}\n', encoding="utf-8")
    message = error_of([{"path": str(tmp_path / "d.jsonl")}])
    assert "data.sources.0.field" in message and "['body', 'title']" in message


def test_non_text_column_and_unparsable_jsonl(tmp_path):
    (tmp_path / "n.jsonl").write_text('{"text": 3}\n{"text": 4}\n', encoding="utf-8")
    assert "not text" in error_of([{"path": str(tmp_path / "n.jsonl")}])
    (tmp_path / "bad.jsonl").write_text('{"text": "w1"}\n{"text": \n', encoding="utf-8")
    assert "cannot read bad.jsonl as jsonl" in error_of([{"path": str(tmp_path / "bad.jsonl")}])


def test_non_utf8_reports_the_byte_offset(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"w1 w2\n\nw3 caf\xe9 w4\n")
    message = error_of([{"path": str(tmp_path / "latin.txt")}])
    assert "byte offset 13 (line 3)" in message and "UTF-8" in message
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "w1"}\n{"text": "\xff"}\n')
    assert "byte offset 25 (line 2)" in error_of([{"path": str(tmp_path / "latin.jsonl")}])


def test_long_line_refused_before_tokenising_or_parsing(tmp_path, monkeypatch):
    calls = []
    tokenizer = word_tokenizer()
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a))
    (tmp_path / "long.txt").write_text("w1 w2\n\n" + "w3 " * 400 + "\n", encoding="utf-8")
    message = error_of(
        [{"path": str(tmp_path / "long.txt")}], tokenizer=tokenizer, max_document_bytes=1000
    )
    assert "line 3 (byte offset 7) is longer than 1,000 bytes" in message
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "w3 " * 400}), encoding="utf-8")
    assert "longer than" in error_of(
        [{"path": str(tmp_path / "long.jsonl")}], tokenizer=tokenizer, max_document_bytes=1000
    )
    assert calls == []


def test_long_parquet_value_refused_by_its_arrow_length(tmp_path):
    texts = [doc(m) for m in range(100, 400)] + ["w5 " * 400]
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "d.parquet"))
    message = error_of([{"path": str(tmp_path / "d.parquet")}], max_document_bytes=1000)
    assert "row 300 of column 'text' is 1,200 bytes, over the 1,000-byte" in message


def test_single_100mb_line_refused_with_the_default_limit(tmp_path):
    with open(tmp_path / "huge.txt", "wb") as fh:  # sparse: 101 MB of zero bytes, no newline
        fh.truncate(101_000_000)
    message = error_of([{"path": str(tmp_path / "huge.txt")}])
    assert "line 1 (byte offset 0) is longer than 100,000,000 bytes" in message


def test_a_long_line_is_tokenised_in_bounded_pieces_with_the_same_ids(tmp_path, monkeypatch):
    """Peak memory must not follow line length: a document longer than a piece is tokenised
    piece by piece, cut at whitespace, and gives the ids one call over the whole line gives."""
    long_line = " ".join(f"w{k % 300}" for k in range(40_000))  # ~200k characters
    path = tmp_path / "one-line.txt"
    path.write_text("\n\n".join([doc(m) for m in range(100, 140)] + [long_line]) + "\n")
    tokenizer = word_tokenizer()
    lengths: list[int] = []
    real = type(tokenizer).__call__

    def recording(self, text, *args, **kwargs):
        lengths.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", recording)
    pieces = build([{"path": str(path), "split_by": "paragraph"}], tokenizer=tokenizer)
    assert max(lengths) <= text_sources._PIECE_CHARS < len(long_line)
    monkeypatch.setattr(text_sources, "_PIECE_CHARS", 10 * len(long_line))  # one call per line
    whole = build([{"path": str(path), "split_by": "paragraph"}], tokenizer=tokenizer)
    for name in ("train", "validation", "test"):
        assert torch.equal(getattr(pieces, name).input_ids, getattr(whole, name).input_ids), name


def test_fewer_tokens_than_one_calibration_batch(tmp_path):
    write_paragraphs(tmp_path / "small.txt", range(100, 110), length=5)
    message = error_of(
        [{"path": str(tmp_path / "small.txt")}], calibration_batch_size=8, max_length=16
    )
    assert "48 train tokens in all" in message and "8 x 16 = 128 tokens" in message


def test_domain_without_enough_train_blocks_for_its_share(tmp_path):
    big = write_paragraphs(tmp_path / "big.txt", range(100, 200), 20)
    small = write_paragraphs(tmp_path / "small.txt", range(200, 210), 5)
    message = error_of(
        [{"path": str(big)}, {"path": str(small), "weight": 3}], calibration_blocks=20
    )
    assert message.startswith("data.sources.1: domain 'small'") and "15 blocks" in message


def test_config_errors_duplicate_domain_unknown_builtin_mixed_formats(tmp_path):
    path = write_paragraphs(tmp_path / "a.txt", range(100, 110))
    assert "give one of them another `domain:`" in error_of(
        [{"path": str(path)}, {"path": str(path)}]
    )
    assert "unknown built-in corpus" in error_of([{"path": "builtin:wiki"}])
    (tmp_path / "b.jsonl").write_text('{"text": "w1"}\n', encoding="utf-8")
    assert "several formats" in error_of([{"path": str(tmp_path)}])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["w1"]})}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert "DatasetDict folder" in error_of([{"path": str(tmp_path / "dd")}])


# ----------------------------------------------------------------------------- built-in corpora


def test_bearing_notes_keep_runner_data_splits_and_labels():
    cfg = DataConfig(samples_per_class_per_load=3, text_style="features")
    splits = build([{"path": "builtin:bearing_notes"}], data_cfg_for_bearing=cfg, max_length=64)
    tests = splits.test_documents["bearing_notes"]
    assert {d.origin for d in tests} == {"test", "heldout"} and all(
        d.label is not None for d in tests
    )
    assert sum(d.origin == "heldout" for d in tests) == 10 * 3  # one held-out load
    assert tests[0].text.startswith(("Drive-end", "Vibration", "Route"))  # sentences, not features
    data = build_dataset(cfg.model_copy(update={"text_style": "sentences"}))
    expected = {"train": 30, "validation": 30, "test": 30 + 30}  # 3 per (class, load): 1/1/1
    assert splits.stats["bearing_notes"]["documents"] == expected
    assert {d.text for d in tests} == set(data["test"]["text"]) | set(data["heldout"]["text"])
    qa = corpora.bearing_documents(cfg, qa=True)
    assert qa[0].text.endswith(f"\nFault: {corpora.fault_phrase(qa[0].label)}")


def test_clean_pydoc_removes_machine_specific_parts():
    raw = (
        "Python Library Documentation: module m\n\nNAME\n    m - prose.\n\nMODULE REFERENCE\n"
        "    https://docs.python.org/3.11/library/m.html\n\nFUNCTIONS\n    f(x=<object object at "
        "0x7f00aa>)\n        Say hi.\n\nDATA\n    tempdir = '/tmp/x'\n\nFILE\n    /usr/lib/m.py\n"
    )
    assert (
        clean_pydoc(raw)
        == "NAME\n    m - prose.\n\nFUNCTIONS\n    f(x=<object object>)\n        Say hi."
    )


def test_stdlib_docs_deterministic_cached_and_free_of_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path))
    # libraries patch the stdlib in memory (transformers: logging.Logger.warning_once); the
    # corpus must not depend on what this process imported
    monkeypatch.setattr(logging.Logger, "patched_here", lambda self: None, raising=False)
    modules = ("textwrap", "json", "logging")
    first = stdlib_documents(modules)
    assert [d.origin for d in first] == list(modules)
    assert len(list((tmp_path / "corpora").glob("stdlib_docs-py*.json"))) == 1
    text = "\n".join(d.text for d in first)
    assert "Python Library Documentation" not in text and " at 0x" not in text
    assert sys.prefix not in text and "\nFILE\n" not in text and "Wrap a single paragraph" in text
    assert "class Logger(" in text and "patched_here" not in text
    monkeypatch.setattr(corpora, "render_stdlib_docs", lambda modules: pytest.fail("not cached"))
    assert stdlib_documents(modules) == first
