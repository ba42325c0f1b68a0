"""Multiple-choice tasks for causal-LM jobs (`evaluation.choice_tasks`), scored by stages.choice_eval.

Three kinds:
* file: a local JSONL file, one item a line: {"context": str, "choices": [str, ...], "label": int}.
* bearing_qa: a bearing inspection note, then "Fault:", and the ten fault classes in readable form
  ("normal", "inner race fault, 0.007 in", ...) as choices. Only runner.data.bearing's test and
  held-out-load notes are used: the notes a job never calibrates or recovers on.
* cloze: next-sentence choice from the held-out TEST documents of the text sources: a few
  consecutive sentences as context, the true next sentence against sentences of other documents
  (same domain where it has enough), all drawn from the seed.

Items are encoded as lm-evaluation-harness encodes them: the continuation is " " + choice, its
tokens are tokens(context + continuation) minus the first len(tokens(context)) (trailing spaces of
the context move into the continuation first); no special tokens unless `add_bos` (lm-eval's
HFLM with add_bos_token=False, which `cascade eval` passes; an empty context is lm-eval's prefix
token, BOS or else EOS); acc_norm divides by len(choice) in characters, as lm-eval does. Checked
against lm-eval itself (pinned in the `eval` extra) by tests/test_lm_eval_harness.py.

The supervised form of bearing QA ("note\\nFault: <answer>" documents, train notes only) is the
corpus builtin:bearing_qa (runner.data.corpora).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from runner.data.bearing import CLASS_NAMES
from runner.data.corpora import Document, bearing_documents, fault_phrase, qa_prompt
from runner.data.text_files import MAX_DOCUMENT_BYTES, TextDataError, scan_lines
from stages.choice_eval import ChoiceItem

BUILTIN_TASKS = ("bearing_qa", "cloze")


@dataclass(frozen=True)
class ChoiceExample:
    """A task item as text: the context, the choices (no leading space) and the right index."""

    context: str
    choices: tuple[str, ...]
    label: int


class ChoiceTaskSpec(BaseModel, extra="forbid"):
    """One `evaluation.choice_tasks` entry; a bare string is a built-in kind or a file path."""

    kind: Literal["file", "bearing_qa", "cloze"] = "file"
    name: str | None = Field(None, min_length=1)
    path: str | None = None
    limit: int | None = Field(None, ge=1, description="at most this many items (seeded sample)")
    add_bos: bool = False
    notes: Literal["test", "heldout", "both"] = "both"  # bearing_qa: which held-out notes
    domains: list[str] | None = None  # cloze: whose test documents (default: every domain)
    context_sentences: int = Field(3, ge=1)  # cloze
    distractors: int = Field(3, ge=1)  # cloze

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"kind": value} if value in BUILTIN_TASKS else {"path": value}
        return value

    @model_validator(mode="after")
    def _path_for_files(self) -> ChoiceTaskSpec:
        if (self.kind == "file") != (self.path is not None):
            raise ValueError("give `path` exactly for kind: file (a JSONL task file)")
        return self

    def task_name(self) -> str:
        return self.name or (Path(self.path).stem if self.path else self.kind)


# ----------------------------------------------------------------------------- JSONL files


def load_choice_file(
    path: str | Path, where: str, *, limit_bytes: int = MAX_DOCUMENT_BYTES
) -> list[ChoiceExample]:
    """Items of a JSONL task file; blank lines are skipped, any bad line is a one-line error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TextDataError(f"{where}.path: task file not found: {path}; check the path")
    examples = []
    for number, _, line in scan_lines(path, where, limit_bytes):
        if not line.strip():
            continue
        at = f"{where}: {path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TextDataError(f"{at}: not valid JSON ({error.msg}); fix that line") from None
        if not isinstance(row, dict):
            raise TextDataError(f"{at}: expected a JSON object with context, choices, label")
        context, choices, label = row.get("context"), row.get("choices"), row.get("label")
        if not isinstance(context, str):
            raise TextDataError(f"{at}: 'context' must be a string (got {type(context).__name__})")
        if not (
            isinstance(choices, list)
            and len(choices) >= 2
            and all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise TextDataError(f"{at}: 'choices' must be a list of >= 2 non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise TextDataError(
                f"{at}: 'label' must be an integer index into choices (0..{len(choices) - 1}), "
                f"got {label!r}"
            )
        examples.append(ChoiceExample(context, tuple(choices), label))
    if not examples:
        raise TextDataError(f"{where}: {path} holds no items; add one JSON object per line")
    return examples


# ----------------------------------------------------------------------------- encoding


def encode_examples(
    examples: Sequence[ChoiceExample], tokenizer, *, add_bos: bool = False
) -> list[ChoiceItem]:
    """lm-eval's encoding (see the module docstring); an empty context becomes [BOS] (or EOS)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    items = []
    for example in examples:
        context = example.context.rstrip()
        moved = example.context[len(context) :]  # lm-eval moves trailing spaces to the choice
        conts = [moved + " " + choice for choice in example.choices]
        encoded = tokenizer(
            [context] + [context + c for c in conts], add_special_tokens=False, verbose=False
        )["input_ids"]
        head = list(encoded[0])
        choices = [list(whole[len(head) :]) for whole in encoded[1:]]
        if add_bos and bos is not None:
            head = [bos, *head]
        if not head:
            head = [bos if bos is not None else eos]
        lengths = [len(choice) for choice in example.choices]
        items.append(ChoiceItem(head, choices, example.label, lengths))
    return items


# ----------------------------------------------------------------------------- bearing QA


def bearing_qa_examples(
    data_cfg: Any = None, *, notes: str = "both", limit: int | None = None, seed: int = 0
) -> list[ChoiceExample]:
    """Held-out notes -> "note\\nFault:" with the ten readable classes as choices."""
    origins = {"test": {"test"}, "heldout": {"heldout"}, "both": {"test", "heldout"}}[notes]
    phrases = tuple(fault_phrase(i) for i in range(len(CLASS_NAMES)))
    examples = [
        ChoiceExample(qa_prompt(doc.text), phrases, doc.label)
        for doc in bearing_documents(data_cfg)
        if doc.split == "test" and doc.origin in origins and doc.label is not None
    ]
    return _sample(examples, limit, seed)


# ----------------------------------------------------------------------------- cloze

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_BAR = re.compile(r"^\s*\|?\s?")  # pydoc's " |  " class-body prefix
_HEADING = re.compile(r"^[A-Z][A-Z ]*[A-Z]$")  # pydoc section names: NAME, DESCRIPTION, ...
_CODE_SIGNS = ("=", "{", "`", ">>>", "\\", "|", "#", "()")  # code, not prose


def split_sentences(text: str) -> list[str]:
    """Sentences of a document, paragraph by paragraph (lines joined, pydoc bars and section
    headings removed, so a heading never glues onto the sentence after it)."""
    sentences: list[str] = []
    paragraph: list[str] = []
    for line in [*text.splitlines(), ""]:
        line = _BAR.sub("", line).strip()
        if line and not _HEADING.match(line):
            paragraph.append(line)
            continue
        flat = " ".join(paragraph)
        sentences += [s.strip() for s in _SENTENCE_END.split(flat) if s.strip()]
        paragraph = []
    return sentences


def _is_prose(sentence: str) -> bool:
    """A sentence worth a cloze item: capitalised, 5-60 words, ends like a sentence, no code."""
    return (
        sentence[0].isupper()
        and sentence[-1] in ".!?"
        and 5 <= len(sentence.split()) <= 60
        and len(sentence) <= 400
        and sum(c.isalpha() for c in sentence) >= 0.5 * len(sentence)
        and not any(sign in sentence for sign in _CODE_SIGNS)
    )


def cloze_examples(
    documents: Mapping[str, Sequence[Document]],
    *,
    seed: int = 0,
    context_sentences: int = 3,
    distractors: int = 3,
    limit: int | None = None,
    per_document: int = 16,
) -> list[ChoiceExample]:
    """context = `context_sentences` consecutive prose sentences, choices = the true next one and
    `distractors` prose sentences of other documents (same domain when it has enough)."""
    rng = random.Random(seed)
    pools: dict[str, list[tuple[int, str]]] = {}  # domain -> (document index, sentence)
    windows: list[tuple[str, int, list[str]]] = []
    for domain in sorted(documents):
        for index, doc in enumerate(documents[domain]):
            sentences = split_sentences(doc.text)
            good = [_is_prose(s) for s in sentences]
            pools.setdefault(domain, []).extend((index, s) for s, g in zip(sentences, good) if g)
            size = context_sentences + 1  # windows may overlap: each answer is a new sentence
            found = [
                sentences[start : start + size]
                for start in range(len(sentences) - size + 1)
                if all(good[start : start + size])
            ]
            windows += [
                (domain, index, w) for w in rng.sample(found, min(per_document, len(found)))
            ]
    everything = [(d, i, s) for d in sorted(pools) for i, s in pools[d]]
    examples = []
    for domain, index, window in windows:
        answer = window[-1]
        local = [s for i, s in pools[domain] if i != index and s != answer]
        if len(set(local)) < distractors:
            local = [s for d, i, s in everything if (d, i) != (domain, index) and s != answer]
        candidates = sorted(set(local))
        if len(candidates) < distractors:
            continue
        choices = rng.sample(candidates, distractors)
        label = rng.randrange(distractors + 1)
        choices.insert(label, answer)
        examples.append(ChoiceExample(" ".join(window[:-1]), tuple(choices), label))
    return _sample(examples, limit, seed)


def _sample(examples: list[ChoiceExample], limit: int | None, seed: int) -> list[ChoiceExample]:
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


# ----------------------------------------------------------------------------- all tasks


def build_choice_tasks(
    specs: Sequence[ChoiceTaskSpec | Mapping | str], tokenizer, **kwargs
) -> dict[str, list[ChoiceItem]]:
    """{task name: encoded items}; kwargs go to choice_examples."""
    return {
        name: encode_examples(examples, tokenizer, add_bos=spec.add_bos)
        for name, (spec, examples) in choice_examples(specs, **kwargs).items()
    }


def choice_examples(
    specs: Sequence[ChoiceTaskSpec | Mapping | str],
    *,
    test_documents: Mapping[str, Sequence[Document]] | None = None,
    data_cfg: Any = None,
    seed: int = 0,
    base_dir: str | Path | None = None,
    where: str = "evaluation.choice_tasks",
) -> dict[str, tuple[ChoiceTaskSpec, list[ChoiceExample]]]:
    """{task name: (its spec, its items as text)}: what the job's scorer encodes and what
    `cascade eval` writes as lm-eval task files. `test_documents` is TextSplits.test_documents
    (for cloze)."""
    tasks: dict[str, tuple[ChoiceTaskSpec, list[ChoiceExample]]] = {}
    for i, raw in enumerate(specs):
        here = f"{where}.{i}"
        spec = ChoiceTaskSpec.model_validate(raw)
        name = spec.task_name()
        if name in tasks:
            raise TextDataError(f"{here}: task name {name!r} is used twice; set `name:`")
        if spec.kind == "file":
            path = Path(spec.path).expanduser()
            if base_dir is not None and not path.is_absolute():
                path = Path(base_dir) / path
            examples = _sample(load_choice_file(path, here), spec.limit, seed)
        elif spec.kind == "bearing_qa":
            examples = bearing_qa_examples(data_cfg, notes=spec.notes, limit=spec.limit, seed=seed)
        else:
            available = dict(test_documents or {})
            chosen = spec.domains or sorted(available)
            missing = [d for d in chosen if d not in available]
            if missing or not chosen:
                raise TextDataError(
                    f"{here}.domains: no test documents for {missing or 'any domain'}; "
                    f"domains with test documents: {sorted(available)}"
                )
            examples = cloze_examples(
                {d: available[d] for d in chosen},
                seed=seed,
                context_sentences=spec.context_sentences,
                distractors=spec.distractors,
                limit=spec.limit,
            )
        if not examples:
            raise TextDataError(
                f"{here}: task {name!r} has no items (cloze needs documents with "
                f"{spec.context_sentences + 1} consecutive prose sentences); lower "
                "context_sentences or add test documents"
            )
        tasks[name] = (spec, examples)
    return tasks
