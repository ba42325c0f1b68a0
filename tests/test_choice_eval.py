"""Zero-shot multiple choice: lm-eval log-likelihood maths, padding, truncation, and the task items.

A table model (logits = table[token] + bias[position]) makes every log-likelihood computable by
hand, and its position term makes wrong position ids under left padding visible.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, tiny_qwen2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2ForCausalLM,
)

from runner.data import corpora
from runner.data.bearing import DataConfig
from runner.data.choice_tasks import (
    ChoiceExample,
    ChoiceTaskSpec,
    bearing_qa_examples,
    build_choice_tasks,
    cloze_examples,
    encode_examples,
    load_choice_file,
    split_sentences,
)
from runner.data.corpora import Document
from runner.data.text_sources import TextDataError
from stages.choice_eval import ChoiceItem, choice_logliks, evaluate_choice_tasks, score

V = 7


class TableLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]] + bias[position_ids[b, t]]."""

    def __init__(self, seed: int = 0, position_bias: float = 1.0, max_positions: int = 64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=gen))
        self.bias = torch.randn(max_positions, V, generator=gen) * position_bias
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.kept: list[int] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        logits = self.table[input_ids] + self.bias[position_ids]
        self.kept.append(logits_to_keep)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class PlainTableLM(TableLM):
    """No position_ids / logits_to_keep arguments: the evaluator must right-pad and slice itself."""

    def forward(self, input_ids, attention_mask=None):
        return super().forward(input_ids, attention_mask)


def by_hand(model: TableLM, context: list[int], choice: list[int]) -> float:
    """Sum over choice tokens of log softmax(table[prev] + bias[pos of prev])[token], in floats."""
    seq = context + choice
    total = 0.0
    for pos in range(len(context) - 1, len(seq) - 1):
        row = (model.table[seq[pos]] + model.bias[pos]).tolist()
        top = max(row)
        log_z = top + math.log(sum(math.exp(x - top) for x in row))
        total += row[seq[pos + 1]] - log_z
    return total


def flat(values: list[list[float]]) -> list[float]:
    return [v for row in values for v in row]


def item(context, choices, label=0, lengths=None):
    return ChoiceItem(context, choices, label, lengths or [len(c) for c in choices])


ITEMS = [
    item([1, 2], [[3], [4, 5]], 1),
    item([6, 1, 2, 3, 4], [[5, 6, 1], [2]], 0),
    item([3], [[1], [2], [3, 3]], 2),
    item([2, 2, 2, 2, 2, 2, 2], [[4, 4], [5]], 1),
]


# ----------------------------------------------------------------------------- maths


def test_logliks_match_hand_computation():
    model = TableLM()
    got = choice_logliks(model, ITEMS, batch_size=3)
    for it, values in zip(ITEMS, got):
        for choice, value in zip(it.choices, values):
            assert value == pytest.approx(by_hand(model, list(it.context), list(choice)), abs=1e-5)


def test_acc_and_acc_norm_on_hand_made_numbers():
    items = [item([1], [[2], [3, 4, 5]], label=1, lengths=[1, 10])]
    assert score(items, [[-2.0, -3.0]]) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}  # -2 vs -0.3
    items.append(item([1], [[2], [3]], label=0, lengths=[5, 5]))
    assert score(items, [[-2.0, -3.0], [-1.0, -1.0]]) == {"acc": 0.5, "acc_norm": 1.0, "n": 2}
    assert score([], [])["n"] == 0


def test_padding_side_batching_and_plain_models_agree():
    model = TableLM(seed=3)
    alone = [choice_logliks(model, [it], batch_size=1)[0] for it in ITEMS]
    for side in ("left", "right"):
        got = choice_logliks(model, ITEMS, batch_size=4, padding_side=side)
        assert flat(got) == pytest.approx(flat(alone), abs=1e-6)
    plain = PlainTableLM(seed=3)
    got = choice_logliks(plain, ITEMS, batch_size=4, padding_side="left")
    assert flat(got) == pytest.approx(flat(alone), abs=1e-6)


def test_only_the_choice_positions_are_computed_under_left_padding():
    model = TableLM(seed=1)
    choice_logliks(model, ITEMS, batch_size=16, padding_side="left")
    assert model.kept == [3]  # the longest choice, not the 7-token width


def test_lm_eval_left_truncation_and_overlong_choice():
    model = TableLM(seed=2)
    long = item([1, 2, 3, 4, 5, 6], [[1, 2], [3, 4]])
    got = choice_logliks(model, [long], max_length=4)[0]
    # lm-eval keeps the last max_length + 1 tokens: context [4, 5, 6] at positions 0..2
    assert got == pytest.approx([by_hand(model, [4, 5, 6], c) for c in ([1, 2], [3, 4])], abs=1e-5)
    with pytest.raises(ValueError, match="exceeds max_length"):
        choice_logliks(model, [item([1], [[1] * 5, [2]])], max_length=4)


CAUSAL_LMS = {
    "llama": lambda: tiny_llama(LlamaForCausalLM),
    "gpt2": lambda: tiny_gpt2(GPT2LMHeadModel),
    "qwen2-sliding-window": lambda: tiny_qwen2(Qwen2ForCausalLM),  # window 4 < the contexts
}
REAL_ITEMS = [
    item([5, 6, 7, 8, 9, 20, 21], [[10, 11], [12], [30, 31, 32, 33]]),
    item([13], [[14, 15, 16], [17]], 1),
    item([40, 41, 42, 43, 44], [[45], [46]]),  # one-token choices only
]


@pytest.mark.parametrize("name", sorted(CAUSAL_LMS))
def test_real_causal_lms_every_path_agrees_with_a_full_forward(name):
    model = CAUSAL_LMS[name]()
    alone = [choice_logliks(model, [it], batch_size=1, share_context=False)[0] for it in REAL_ITEMS]
    for side in ("left", "right"):
        batched = choice_logliks(
            model, REAL_ITEMS, batch_size=4, padding_side=side, share_context=False
        )
        assert flat(batched) == pytest.approx(flat(alone), abs=1e-4)
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    shared = choice_logliks(model, REAL_ITEMS)  # one context pass per item, KV cache repeated
    hook.remove()
    assert len(calls) == 2 + 2 + 1  # context, then all choices; one-token choices need no second
    assert flat(shared) == pytest.approx(flat(alone), abs=1e-4)
    seq = torch.tensor([[5, 6, 7, 8, 9, 20, 21, 30, 31, 32, 33]])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq).logits[0].float(), -1)
    expected = sum(float(logp[k - 1, seq[0, k]]) for k in range(7, 11))
    assert alone[0][2] == pytest.approx(expected, abs=1e-4)
    truncated = choice_logliks(model, REAL_ITEMS[:1], max_length=5)  # too long to share
    unshared = choice_logliks(model, REAL_ITEMS[:1], max_length=5, share_context=False)
    assert flat(truncated) == pytest.approx(flat(unshared), abs=1e-6)


def test_bad_items_are_refused():
    with pytest.raises(ValueError, match="label 2"):
        item([1], [[2], [3]], label=2)
    with pytest.raises(ValueError, match=">= 2 choices"):
        item([1], [[2]])
    with pytest.raises(ValueError, match="empty context"):
        choice_logliks(TableLM(), [item([], [[2], [3]])])


# ----------------------------------------------------------------------------- task files


def test_choice_file_reads_items_and_skips_blank_lines(tmp_path):
    rows = [{"context": "Sky is", "choices": ["blue", "green"], "label": 0}] * 2
    (tmp_path / "t.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n", encoding="utf-8")
    assert (
        load_choice_file(tmp_path / "t.jsonl", "x")
        == [ChoiceExample("Sky is", ("blue", "green"), 0)] * 2
    )


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"context": "a", "choices": ["b", "c"], "label": 0', "line 2: not valid JSON"),
        ('{"context": "a", "choices": ["b"], "label": 0}', "line 2: 'choices' must be a list"),
        ('{"context": "a", "choices": ["b", "c"], "label": 2}', "line 2: 'label' must be"),
        ('{"context": 1, "choices": ["b", "c"], "label": 0}', "line 2: 'context' must be"),
        ('["a"]', "line 2: expected a JSON object"),
    ],
)
def test_choice_file_errors_name_the_line(tmp_path, line, expected):
    good = json.dumps({"context": "a", "choices": ["b", "c"], "label": 1})
    (tmp_path / "t.jsonl").write_text(f"{good}\n{line}\n", encoding="utf-8")
    with pytest.raises(TextDataError, match=expected) as info:
        load_choice_file(tmp_path / "t.jsonl", "evaluation.choice_tasks.0")
    assert "\n" not in str(info.value) and str(info.value).startswith("evaluation.choice_tasks.0")


def test_empty_or_missing_choice_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(TextDataError, match="holds no items"):
        load_choice_file(tmp_path / "e.jsonl", "x")
    with pytest.raises(TextDataError, match="task file not found"):
        load_choice_file(tmp_path / "none.jsonl", "x")


# ----------------------------------------------------------------------------- encoding


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: a space is part of the following token) trained here."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(
        ["The bearing has an inner race fault. Fault: normal"] * 20, trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def test_encoding_follows_lm_eval():
    tok = bpe_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    (enc,) = encode_examples([ChoiceExample("Fault:", ("normal", "inner race"), 1)], tok)
    assert list(enc.context) == ids("Fault:")
    assert [list(c) for c in enc.choices] == [
        ids("Fault: normal")[len(ids("Fault:")) :],
        ids(" inner race"),
    ]
    assert list(enc.choice_lengths) == [6, 10]  # characters of the choice, no leading space
    (spaced,) = encode_examples([ChoiceExample("Fault: ", ("normal", "inner race"), 1)], tok)
    assert (
        spaced.context == enc.context
        and spaced.choices[0] == ids("  normal")[-len(spaced.choices[0]) :]
    )
    (empty,) = encode_examples([ChoiceExample("", ("a", "b"), 0)], tok)
    assert list(empty.context) == [tok.eos_token_id]
    (bos,) = encode_examples([ChoiceExample("Fault:", ("a", "b"), 0)], tok, add_bos=True)
    assert list(bos.context) == [tok.bos_token_id, *ids("Fault:")]


# ----------------------------------------------------------------------------- built-in tasks

TINY = DataConfig(samples_per_class_per_load=3)


def test_bearing_qa_uses_held_out_notes_only():
    examples = bearing_qa_examples(TINY)
    assert len(examples) == 60 and len(bearing_qa_examples(TINY, notes="heldout")) == 30
    assert (
        examples[0].choices[0] == "normal"
        and examples[0].choices[1] == "inner race fault, 0.007 in"
    )
    assert examples[0].context.endswith("\nFault:") and {e.label for e in examples} == set(
        range(10)
    )
    qa_corpus = corpora.builtin_documents("bearing_qa", TINY)  # the supervised form's train split
    training = [doc.text for doc in qa_corpus if doc.split == "train"]
    assert len(training) == 30 and all("\nFault: " in t for t in training)
    notes = {e.context.removesuffix("\nFault:") for e in examples}
    assert not notes & {t.split("\nFault:")[0] for t in training}
    assert bearing_qa_examples(TINY, limit=7, seed=1) == bearing_qa_examples(TINY, limit=7, seed=1)
    assert corpora.qa_text("n", 9) == "n\nFault: outer race fault, 0.021 in"


def cloze_documents():
    text = lambda k: " ".join(f"Sentence {k} number {i} says something plain." for i in range(6))  # noqa: E731
    return {"prose": [Document(text(k)) for k in range(5)]}


def test_cloze_true_next_sentence_against_other_documents():
    docs = cloze_documents()
    examples = cloze_examples(docs, seed=0, context_sentences=3)
    assert examples and examples == cloze_examples(docs, seed=0, context_sentences=3)
    assert examples != cloze_examples(docs, seed=1, context_sentences=3)
    for ex in examples:
        answer = ex.choices[ex.label]
        source = next(d.text for d in docs["prose"] if ex.context in d.text)
        assert f"{ex.context} {answer}" in source  # the true NEXT sentence
        others = [c for i, c in enumerate(ex.choices) if i != ex.label]
        assert len(others) == 3 and not any(c in source for c in others)


def test_split_sentences_drops_pydoc_headings_and_bars():
    text = "DESCRIPTION\n    First one here. Second one\n    goes on.\n |  \n |  Third in a class."
    assert split_sentences(text) == ["First one here.", "Second one goes on.", "Third in a class."]


def test_build_choice_tasks_shorthand_names_and_errors(tmp_path):
    rows = [{"context": "w1 w2", "choices": ["w3", "w4"], "label": 1}]
    (tmp_path / "mine.jsonl").write_text(json.dumps(rows[0]), encoding="utf-8")
    tok = bpe_tokenizer()
    tasks = build_choice_tasks(
        ["mine.jsonl", "cloze", {"kind": "bearing_qa", "limit": 5}],
        tok,
        test_documents=cloze_documents(),
        data_cfg=TINY,
        base_dir=tmp_path,
    )
    assert sorted(tasks) == ["bearing_qa", "cloze", "mine"] and len(tasks["bearing_qa"]) == 5
    with pytest.raises(TextDataError, match="used twice"):
        build_choice_tasks(["cloze", "cloze"], tok, test_documents=cloze_documents())
    with pytest.raises(
        TextDataError, match=r"choice_tasks.0.domains: no test documents for \['wiki'\]"
    ):
        build_choice_tasks([{"kind": "cloze", "domains": ["wiki"]}], tok, test_documents={})
    with pytest.raises(ValueError, match="give `path` exactly"):
        ChoiceTaskSpec(kind="file")


def test_evaluate_choice_tasks_end_to_end_on_a_tiny_llama():
    tok = bpe_tokenizer()
    tasks = build_choice_tasks([{"kind": "bearing_qa", "limit": 4}], tok, data_cfg=TINY)
    model = tiny_llama(LlamaForCausalLM, vocab_size=len(tok), max_position_embeddings=256)
    result = evaluate_choice_tasks(model, tasks, batch_size=8)
    assert result["bearing_qa"]["n"] == 4 and 0 <= result["bearing_qa"]["acc_norm"] <= 1
