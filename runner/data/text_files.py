"""Reading local text files for causal-LM jobs, streamed and checked (text_sources.py uses it).

Memory follows what is kept, not the size of a file: plain text is read line by line with a
bounded `readline`, so a 100 MB line is refused after reading the limit plus one byte, never decoded
or tokenised whole; jsonl/json/csv files get the same line scan (size, UTF-8 with the byte offset
of a bad byte) before `datasets` parses them; parquet/arrow columns are length-checked on the Arrow
data before any value becomes a Python string. `open_source` hands out a function that iterates
the documents again each time it is called, so a caller can count first and tokenise second.

`datasets` only reads local files here: `load_dataset("json"|"csv"|"parquet", data_files=...)`,
`Dataset.from_file` and `load_from_disk`, with the Arrow cache in a temporary folder that is
removed afterwards (nothing goes to the home hub cache, nothing to the network).
"""

from __future__ import annotations

import glob
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

MAX_DOCUMENT_BYTES = 100_000_000  # one line / paragraph / file-document; larger ones are refused

_EXTENSIONS = {
    ".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
    ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow",
}  # fmt: skip
_LINE_FORMATS = ("text", "jsonl", "json", "csv")  # scanned line by line before parsing
_BATCH_ROWS = 256


class TextDataError(ValueError):
    """Bad text data: the message is one line naming the cause, the source and what to do."""


class FileSpec(Protocol):
    """What reading needs from a source (runner.data.text_sources.TextSource has these fields)."""

    path: str
    format: str
    field: str
    split_by: str


# ----------------------------------------------------------------------------- resolving paths


def resolve_source(source: FileSpec, where: str, base_dir: Path | None = None):
    """(format, paths) of a file source: the files to read, or [folder] for an Arrow folder.

    Raises TextDataError for a missing path, a glob or folder matching nothing, a DatasetDict
    folder, an unknown extension or mixed formats under "auto".
    """
    raw = os.path.expanduser(source.path)
    relative = "" if os.path.isabs(raw) else f" (relative to {base_dir or os.getcwd()})"
    if base_dir is not None and not os.path.isabs(raw):
        raw = str(Path(base_dir) / raw)
    if glob.has_magic(raw):
        paths = sorted(Path(p) for p in glob.glob(raw, recursive=True) if os.path.isfile(p))
        if not paths:
            raise TextDataError(
                f"{where}.path: glob {raw} matched no files; fix the pattern or the folder"
            )
    elif os.path.isdir(raw):
        folder = Path(raw)
        if (folder / "dataset_dict.json").exists():
            splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise TextDataError(
                f"{where}.path: {folder} is a DatasetDict folder; point path at one split "
                f"folder inside it ({', '.join(splits)})"
            )
        if (folder / "dataset_info.json").exists() or (folder / "state.json").exists():
            if source.format not in ("auto", "arrow"):
                raise TextDataError(
                    f"{where}.format: {folder} is an Arrow folder (save_to_disk), not "
                    f"{source.format}; set format to arrow or auto"
                )
            return "arrow", [folder]
        paths = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            and (source.format != "auto" or p.suffix.lower() in _EXTENSIONS)
        )
        if not paths:
            known = " ".join(sorted(_EXTENSIONS))
            raise TextDataError(
                f"{where}.path: folder {folder} holds no data files ({known}); add files "
                "or point path at them"
            )
    elif os.path.isfile(raw):
        paths = [Path(raw)]
    elif os.path.lexists(raw):  # it exists, but is no file or folder: say what it is
        raise TextDataError(
            f"{where}.path: {source.path} is {_kind(raw)}, not a file or folder of text; "
            "save the text to a file and point path at it"
        )
    else:
        raise TextDataError(
            f"{where}.path: file not found: {source.path}{relative}; check the path"
        )
    if source.format != "auto":
        return source.format, paths
    formats = {}
    for path in paths:
        fmt = _EXTENSIONS.get(path.suffix.lower())
        if fmt is None:
            raise TextDataError(
                f"{where}.format: cannot tell the format of {path} from its extension; "
                f"set {where}.format"
            )
        formats.setdefault(fmt, path)
    if len(formats) > 1:
        found = ", ".join(f"{fmt} ({path.name})" for fmt, path in formats.items())
        raise TextDataError(
            f"{where}.path: files of several formats ({found}); use one source per format"
        )
    return next(iter(formats)), paths


def _kind(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a broken symbolic link"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    return "a socket" if stat.S_ISSOCK(mode) else "a device"


# ----------------------------------------------------------------------------- line scanning


def split_at_whitespace(text: str) -> tuple[str, str]:
    """(head, tail): tail starts at the last whitespace run, so no word is cut in two and the
    run stays with the word after it (how BPE pre-tokenisers attach spaces)."""
    end = len(text)
    while end > 0 and not text[end - 1].isspace():
        end -= 1
    while end > 1 and text[end - 2].isspace():
        end -= 1
    start = end - 1
    return (text[:start], text[start:]) if start > 0 else (text, "")


def scan_lines(path: Path, where: str, limit: int) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset, text without its newline), reading at most limit+1 bytes a line.

    UTF-8 is checked line by line (a newline byte never occurs inside a multi-byte character), so
    the reported offset is exact; a leading byte-order mark is dropped.
    """
    with open(path, "rb") as fh:
        offset, number = 0, 0
        while raw := fh.readline(limit + 1):
            number += 1
            body = raw[:-1] if raw.endswith(b"\n") else raw
            if len(body) > limit:
                raise TextDataError(
                    f"{where}: {path} line {number} (byte offset {offset}) is longer than "
                    f"{limit:,} bytes; split it into shorter lines or documents"
                )
            body = body[:-1] if body.endswith(b"\r") else body
            start = 3 if number == 1 and body.startswith(b"\xef\xbb\xbf") else 0
            try:
                text = body[start:].decode("utf-8")
            except UnicodeDecodeError as error:
                raise TextDataError(
                    f"{where}: {path} is not UTF-8: byte offset {offset + start + error.start} "
                    f"(line {number}) holds {body[start + error.start : start + error.end]!r}; "
                    "re-encode the file as UTF-8"
                ) from None
            yield number, offset, text
            offset += len(raw)


def _text_documents(path: Path, where: str, split_by: str, limit: int) -> Iterator[str]:
    if split_by == "file":
        size = path.stat().st_size
        if size > limit:
            raise TextDataError(
                f"{where}: {path} is {size:,} bytes, over the {limit:,}-byte document limit; "
                "use split_by: paragraph or split the file"
            )
        text = "\n".join(line for _, _, line in scan_lines(path, where, limit)).strip()
        if text:
            yield text
        return
    paragraph: list[str] = []
    size, first = 0, 0
    for number, _, line in scan_lines(path, where, limit):
        if line.strip():
            if not paragraph:
                first = number
            paragraph.append(line)
            size += len(line) + 1
            if size > limit:
                raise TextDataError(
                    f"{where}: {path} paragraph from line {first} is longer than {limit:,} "
                    "bytes; separate it with blank lines or split the file"
                )
        elif paragraph:
            yield "\n".join(paragraph).strip()
            paragraph, size = [], 0
    if paragraph:
        yield "\n".join(paragraph).strip()


# ----------------------------------------------------------------------------- datasets


@contextmanager
def _quiet_datasets():
    import datasets  # lazy: importing `datasets` costs seconds; plain text sources skip it

    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_table(fmt: str, paths: list[Path], where: str, cache_dir: str):
    """A `datasets.Dataset` of local files: Arrow on disk (memory-mapped), cache in cache_dir."""
    with _quiet_datasets() as datasets:
        try:
            if fmt == "arrow" and paths[0].is_dir():
                dataset = datasets.load_from_disk(str(paths[0]))
            elif fmt == "arrow":
                parts = [datasets.Dataset.from_file(str(p)) for p in paths]
                dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
            else:
                builder = "json" if fmt in ("jsonl", "json") else fmt
                files = [str(p) for p in paths]
                dataset = datasets.load_dataset(
                    builder, data_files=files, split="train", cache_dir=cache_dir
                )
        except Exception as error:  # datasets/pyarrow raise many types for unparsable files
            cause = error.__cause__ or error
            detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
            names = ", ".join(p.name for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
            raise TextDataError(
                f"{where}: cannot read {names} as {fmt} ({detail}); fix the file or set "
                f"{where}.format"
            ) from None
    if not isinstance(dataset, datasets.Dataset):
        raise TextDataError(
            f"{where}.path: {paths[0]} holds several splits; point path at one split folder"
        )
    return dataset


def _column_documents(dataset, source: FileSpec, where: str, limit: int) -> Iterator[str]:
    """The `field` column in Arrow batches; each batch is length-checked before its values
    become Python strings (nothing is written next to the user's files)."""
    import pyarrow.compute as pc  # lazy: with `datasets`, only for table sources

    if source.field not in dataset.column_names:
        raise TextDataError(
            f"{where}.field: no column {source.field!r}; the data has columns "
            f"{dataset.column_names}; set {where}.field to one of them"
        )
    dtype = getattr(dataset.features[source.field], "dtype", type(dataset.features[source.field]))
    if dtype not in ("string", "large_string"):
        raise TextDataError(
            f"{where}.field: column {source.field!r} holds {dtype} values, not text; "
            "choose a text column"
        )
    batches = dataset.select_columns([source.field]).with_format("arrow")
    for number, batch in enumerate(batches.iter(batch_size=_BATCH_ROWS)):
        column = batch.column(source.field)
        lengths = pc.binary_length(column)
        longest = pc.max(lengths).as_py()
        if longest is not None and longest > limit:
            index = pc.index(pc.greater(lengths, limit), True).as_py()
            raise TextDataError(
                f"{where}: row {number * _BATCH_ROWS + index} of column {source.field!r} is "
                f"{lengths[index].as_py():,} bytes, over the {limit:,}-byte document limit; "
                "split it into shorter documents"
            )
        for value in column.to_pylist():
            if value is not None and value.strip():
                yield value.strip()


# ----------------------------------------------------------------------------- documents


@contextmanager
def open_source(source: FileSpec, where: str, *, base_dir=None, limit=MAX_DOCUMENT_BYTES):
    """A function that iterates the source's document texts (callable repeatedly, same order).

    Line-based files are fully scanned (size, UTF-8) before `datasets` parses them; the Arrow
    cache lives in a temporary folder removed on exit.
    """
    fmt, paths = resolve_source(source, where, base_dir)
    if fmt == "json":
        for path in paths:
            if path.stat().st_size > limit:
                raise TextDataError(
                    f"{where}: {path} is a JSON file over {limit:,} bytes, which is parsed whole; "
                    "write it as JSON lines (.jsonl, one object per line)"
                )
    if fmt == "text":
        yield lambda: (
            doc for path in paths for doc in _text_documents(path, where, source.split_by, limit)
        )
        return
    if fmt in _LINE_FORMATS:
        for path in paths:
            for _ in scan_lines(path, where, limit):
                pass
    with tempfile.TemporaryDirectory(prefix="cascade-datasets-") as cache_dir:
        held = [_load_table(fmt, paths, where, cache_dir)]
        try:
            yield lambda: _column_documents(held[0], source, where, limit)
        finally:
            held.clear()  # drop the memory map before its cache folder is removed
