"""Built-in text corpora that every machine already has, so causal-LM jobs need no downloads.

* `builtin:stdlib_docs`: English prose (and some signatures) from the Python standard library's own
  documentation, `pydoc.render_doc(module, renderer=pydoc.plaintext)` of a FIXED module list, one
  document per module. It is a general-English domain a small LM has seen something like in
  pre-training, so perplexity on it says how much general language modelling a cut kept.
* `builtin:bearing_notes`: the bearing-fault task (runner.data.bearing, text_style "sentences") as
  English inspection notes, one document per note, with its fault label. Its train/validation/test
  split is runner.data.bearing's own (split by signal, stratified by class and load); held-out-load
  notes join the test side, so neither ever reaches calibration or recovery.
* `builtin:bearing_qa`: the same notes as "note\\nFault: <fault>" documents, the supervised form of
  the bearing-QA choice task (recovery with `loss: lm` learns to answer it; with kd, the plain
  notes suffice and no label is used).

The stdlib text depends on the Python version (docstrings and signature rendering change between
minor versions, rarely in patch releases): it is identical on every machine with the same Python
version. Machine-specific parts are removed (title line, MODULE REFERENCE with its versioned URL,
FILE paths, DATA values, object addresses), and the text is rendered in a fresh isolated
interpreter, because libraries patch the stdlib in memory (transformers adds methods to
logging.Logger). Rendering the 46 modules takes 1.2 s on a free core and up to 5 s on the shared
2-core CPU (interpreter start and imports included); reading the cache takes ~5 ms. The cache lives under $CASCADE_CACHE (or
~/.cache/cascade)/corpora, keyed by the exact Python version, the module list and CORPUS_VERSION.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.data.bearing import CLASS_NAMES, DataConfig, build_dataset
from runner.paths import cache_root
from stages.atomic import write_json_atomic

log = logging.getLogger(__name__)

CORPUS_VERSION = 1  # bump when the cleaning below changes: it invalidates cached corpora

# Pure-Python, prose-rich modules whose documentation does not depend on the platform (no os, sys,
# socket, time, locale, ...: their constants and data differ between machines).
STDLIB_MODULES: tuple[str, ...] = (
    "argparse", "base64", "bisect", "calendar", "cmd", "collections", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib", "email.message",
    "fnmatch", "fractions", "functools", "getopt", "gettext", "graphlib", "gzip", "heapq",
    "html.parser", "ipaddress", "json", "logging", "numbers", "optparse", "pprint", "queue",
    "random", "sched", "secrets", "shlex", "statistics", "string", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "urllib.parse", "wave", "weakref", "zipfile",
)  # fmt: skip

BUILTIN_CORPORA = ("stdlib_docs", "bearing_notes", "bearing_qa")

# Readable class names (runner.data.bearing.CLASS_NAMES order) for prompts and answers.
_KINDS = {"IR": "inner race fault", "B": "ball fault", "OR": "outer race fault"}


@dataclass(frozen=True)
class Document:
    """One document of a domain.

    `split` is None when the document's split is drawn by runner.data.text_sources from the seed,
    or "train"/"validation"/"test" when the corpus fixes it (the bearing notes). `origin` says
    where it came from (module name, or runner.data.bearing split: "test" vs "heldout"); `label` is
    the bearing class index where there is one.
    """

    text: str
    split: str | None = None
    label: int | None = None
    origin: str | None = None


# ----------------------------------------------------------------------------- stdlib docs

_SECTION = re.compile(r"^[A-Z][A-Z ]*[A-Z]$")  # pydoc section headings: NAME, CLASSES, FILE, ...
_DROPPED_SECTIONS = {"MODULE REFERENCE", "FILE", "DATA", "VERSION", "DATE", "AUTHOR", "CREDITS"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def clean_pydoc(text: str) -> str:
    """Drop what varies by machine or is boilerplate: the "Python Library Documentation" title,
    MODULE REFERENCE (versioned URL and disclaimer), FILE (install path), DATA (values, some
    machine-specific), VERSION/DATE/AUTHOR/CREDITS, and " at 0x..." object addresses."""
    kept: list[str] = []
    keep = True
    for line in text.splitlines()[1:]:  # line 0: "Python Library Documentation: module x"
        if _SECTION.match(line):
            keep = line not in _DROPPED_SECTIONS
        if keep:
            kept.append(line.rstrip())
    return _ADDRESS.sub("", "\n".join(kept)).strip()


# A fresh interpreter, isolated (-I) and without site (-S): imported libraries patch the stdlib
# (transformers adds warning_once and friends to logging.Logger), and pydoc documents the module
# as it is in memory, so rendering in the job's own process would depend on what it imported.
_RENDER = (
    "import importlib, json, pydoc, sys\n"
    "print(json.dumps([pydoc.render_doc(importlib.import_module(m), renderer=pydoc.plaintext)"
    " for m in sys.argv[1:]]))"
)


def render_stdlib_docs(modules: tuple[str, ...] = STDLIB_MODULES) -> list[tuple[str, str]]:
    """(module name, cleaned plain-text documentation) for each module, in the given order."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _RENDER, *modules],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"builtin:stdlib_docs: rendering the documentation failed ({last})")
    return [(name, clean_pydoc(text)) for name, text in zip(modules, json.loads(done.stdout))]


def _cache_dir() -> Path:
    return cache_root() / "corpora"


def _stdlib_cache_path(modules: tuple[str, ...]) -> Path:
    version = ".".join(str(part) for part in sys.version_info[:3])
    key = hashlib.sha256(json.dumps([CORPUS_VERSION, version, modules]).encode()).hexdigest()[:12]
    return _cache_dir() / f"stdlib_docs-py{version}-{key}.json"


def stdlib_documents(modules: tuple[str, ...] = STDLIB_MODULES) -> list[Document]:
    """The stdlib documentation corpus, one Document per module; read from the cache when present.

    A cache that cannot be read is re-rendered and rewritten; one that cannot be written only
    costs the rendering time next run (logged), it never fails the job.
    """
    path = _stdlib_cache_path(modules)
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached["modules"] == list(modules) and len(cached["texts"]) == len(modules):
            return [Document(text, origin=name) for name, text in zip(modules, cached["texts"])]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    rendered = render_stdlib_docs(modules)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"modules": list(modules), "texts": [t for _, t in rendered]})
    except OSError as error:
        log.warning(
            "stdlib_docs corpus not cached at %s (%s); it is rendered again next time", path, error
        )
    return [Document(text, origin=name) for name, text in rendered]


# ----------------------------------------------------------------------------- bearing notes


def fault_phrase(label: int) -> str:
    """Readable class name: "normal", "inner race fault, 0.007 in", "ball fault, 0.014 in", ..."""
    name = CLASS_NAMES[label]
    if name == "normal":
        return "normal"
    kind, size = name.split("_")
    return f"{_KINDS[kind]}, 0.{size} in"


QA_PROMPT = "{note}\nFault:"  # the choice task's context; the answer follows as " <fault phrase>"


def qa_prompt(note: str) -> str:
    return QA_PROMPT.format(note=note)


def qa_text(note: str, label: int) -> str:
    """A supervised bearing-QA document: exactly the choice task's context + " " + the answer."""
    return f"{qa_prompt(note)} {fault_phrase(label)}"


_SPLIT_OF = {"train": "train", "validation": "validation", "test": "test", "heldout": "test"}


def _sentences_cfg(data_cfg: Any):
    """The same bearing data written as English notes (calibration_mix only fits 'features')."""
    raw = data_cfg.model_dump() if data_cfg is not None else {}
    return DataConfig.model_validate({**raw, "text_style": "sentences", "calibration_mix": []})


def bearing_documents(data_cfg: Any = None, *, qa: bool = False) -> list[Document]:
    """Every bearing note of runner.data.bearing's train/validation/test/heldout splits (not its
    calibration split, a subset of train), with runner.data.bearing's split; `qa` appends the
    "Fault:" answer."""
    dataset = build_dataset(_sentences_cfg(data_cfg))
    documents = []
    for name, split in _SPLIT_OF.items():
        for row in dataset[name]:
            text = qa_text(row["text"], row["label"]) if qa else row["text"]
            documents.append(Document(text, split=split, label=row["label"], origin=name))
    return documents


def builtin_documents(name: str, data_cfg: Any = None) -> list[Document]:
    """Documents of the built-in corpus `name` (one of BUILTIN_CORPORA)."""
    if name == "stdlib_docs":
        return stdlib_documents()
    if name in ("bearing_notes", "bearing_qa"):
        return bearing_documents(data_cfg, qa=name == "bearing_qa")
    raise ValueError(f"unknown built-in corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
