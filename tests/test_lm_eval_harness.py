"""Evaluation through lm-evaluation-harness: `cascade eval`, our task files, our scorer == lm-eval.

A tiny causal Llama pruned unevenly (per-layer layout, loaded with load_pruned) and a byte-level
BPE tokenizer trained here (BOS != EOS, so lm-eval's choice of prefix token for an empty context
is visible). lm-eval runs offline on task files over local JSONL; every test that needs it is
skipped, saying why, when the `eval` extra is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from tiny_models import prune_units, tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from runner.cli.eval import main as eval_main
from runner.data.bearing import DataConfig
from runner.data.choice_tasks import ChoiceExample, choice_examples, encode_examples
from runner.data.corpora import Document, qa_text
from runner.data.lm_eval_tasks import write_task
from runner.exporters import export_checkpoint, get_exporter
from stages.arch import get_adapter
from stages.checkpoint import load_pruned, save_checkpoint
from stages.choice_eval import choice_logliks, score

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install '.[eval]', lm-eval==0.4.13)",
)
TINY_DATA = DataConfig(samples_per_class_per_load=3)


def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on bearing notes and prose; BOS <s>, EOS <|endoftext|>."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [qa_text("Inspection note: the bearing runs at 1797 rpm.", k) for k in range(10)]
    backend.train_from_iterator(texts * 5 + [d.text for d in cloze_documents()["prose"]], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>"
    )


def cloze_documents():
    text = lambda k: " ".join(f"Sentence {k} number {i} says something plain." for i in range(6))  # noqa: E731
    return {"prose": [Document(text(k)) for k in range(5)]}


def pruned_model(tok):
    """Per-layer layout: layer 0 keeps 1 KV group + 40 channels, layer 2 dropped."""
    model = tiny_llama(LlamaForCausalLM, vocab_size=len(tok), max_position_embeddings=256)
    adapter = get_adapter(model)
    prune_units(adapter, model, {0: [1]}, {0: list(range(40)), 1: list(range(5, 35))})
    adapter.remove_layers(model, [2])
    return model


def items_by_task():
    """bearing_qa (contexts longer than the model's 256 positions: lm-eval's left truncation),
    cloze, and a file task with an empty context and a context ending in spaces."""
    tasks = choice_examples(
        [{"kind": "bearing_qa", "limit": 6}, {"kind": "cloze", "limit": 6}],
        test_documents=cloze_documents(),
        data_cfg=TINY_DATA,
    )
    odd = [
        ChoiceExample("", ("Fault", "Sentence"), 0),
        ChoiceExample("Sentence 3 number  ", ("1 says", "2 says", "9 says"), 1),
        ChoiceExample("Fault:", ("normal", "inner race fault, 0.007 in"), 1),
    ]
    return {name: examples for name, (_, examples) in tasks.items()} | {"odd": odd}


def lm_eval_run(wrapper, examples: dict, folder):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = [write_task(name, items, folder) for name, items in examples.items()]
    return simple_evaluate(
        model=wrapper,
        tasks=names,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )


@needs_lm_eval
def test_our_scorer_and_lm_eval_agree_item_by_item(tmp_path):
    tok = tokenizer()
    source = pruned_model(tok)
    model = load_pruned(save_checkpoint(source, tok, tmp_path / "ckpt"))
    examples = items_by_task()
    from lm_eval.models.huggingface import HFLM

    wrapper = HFLM(pretrained=model, tokenizer=tok, batch_size=4, add_bos_token=False)
    results = lm_eval_run(wrapper, examples, tmp_path / "tasks")
    picks = set()
    for name, items in examples.items():
        encoded = encode_examples(items, tok)
        ours = choice_logliks(model, encoded, batch_size=4)
        mine = score(encoded, ours)
        theirs = results["results"][f"cascade_{name}"]
        assert (theirs["acc,none"], theirs["acc_norm,none"]) == (mine["acc"], mine["acc_norm"])
        samples = sorted(results["samples"][f"cascade_{name}"], key=doc_id)
        assert len(samples) == len(items)
        for sample, values in zip(samples, ours):
            logliks = [float(r[0]) for r in sample["filtered_resps"]]
            torch.testing.assert_close(logliks, values, rtol=1e-5, atol=1e-4)
            picks.add(max(range(len(values)), key=values.__getitem__))
    assert len(picks) > 1  # the model does not answer the same index everywhere


@needs_lm_eval
def test_lm_eval_loads_a_remote_code_export_with_the_same_numbers(tmp_path):
    tok = tokenizer()
    source = pruned_model(tok)
    folder = export_checkpoint(
        save_checkpoint(source, tok, tmp_path / "ckpt"),
        get_exporter("hf", remote_code=True),
        tmp_path / "hf",
        log=lambda _: None,
    )
    from lm_eval.models.huggingface import HFLM

    wrapper = HFLM(
        pretrained=str(folder), trust_remote_code=True, device="cpu", dtype="float32",
        add_bos_token=False, batch_size=4,
    )  # fmt: skip
    assert type(wrapper.model).__name__ == "CascadeLlamaForCausalLM"
    examples = {"cloze": items_by_task()["cloze"]}
    samples = lm_eval_run(wrapper, examples, tmp_path / "tasks")["samples"]["cascade_cloze"]
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(samples, key=doc_id)]
    ours = choice_logliks(source, encode_examples(examples["cloze"], tok))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)


def doc_id(sample: dict) -> int:
    return sample["doc_id"]


# ---- the command --------------------------------------------------------------------------------
def job_folder(tmp_path, tok):
    """A cascade-style output folder: checkpoint/ and the job.yaml that names its choice tasks."""
    out = tmp_path / "run"
    save_checkpoint(pruned_model(tok), tok, out / "checkpoint")
    (tmp_path / "notes.txt").write_text("A plain note about a bearing.\n")
    job = {
        "name": "tiny",
        "task": "causal_lm",
        "models": [{"ref": str(out / "checkpoint"), "max_length": 32}],
        "data": {"samples_per_class_per_load": 3, "sources": [str(tmp_path / "notes.txt")]},
        "target": {"ratio": 1.2},
        "stages": [{"kind": "channels", "criterion": "wanda", "share": 1.0}],
        "evaluation": {"choice_tasks": [{"kind": "bearing_qa", "limit": 5, "name": "qa"}]},
    }
    (out / "job.yaml").write_text(json.dumps(job))
    return out


def run_eval(capsys, *argv):
    code = eval_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@needs_lm_eval
def test_cascade_eval_scores_the_jobs_items_and_keeps_task_files(tmp_path, capsys):
    tok = tokenizer()
    run = job_folder(tmp_path, tok)
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"context": "Fault:", "choices": ["normal", "ball"], "label": 0}))
    code, out, err = run_eval(
        capsys, run / "checkpoint", "--tasks", f"qa,{items}", "--json",
        "--write-tasks", tmp_path / "tasks", "--batch-size", "3",
    )  # fmt: skip
    assert code == 0, err
    table = json.loads(out)
    expected = choice_examples([{"kind": "bearing_qa", "limit": 5}], data_cfg=TINY_DATA)
    encoded = encode_examples(expected["bearing_qa"][1], tok)
    model = load_pruned(run / "checkpoint")
    mine = score(encoded, choice_logliks(model, encoded))
    assert table["qa"] == {"n": 5, "acc": mine["acc"], "acc_norm": mine["acc_norm"]}
    assert table["items"]["n"] == 1
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == [
        "items.jsonl", "items.yaml", "qa.jsonl", "qa.yaml"
    ]  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "qa.jsonl").read_text().splitlines()]
    assert [r["context"] for r in rows] == [e.context for e in expected["bearing_qa"][1]]
    # the written task file runs as any lm-eval task file; the default tasks are the job's
    code, out, err = run_eval(capsys, run / "checkpoint", "--tasks", tmp_path / "tasks" / "qa.yaml")
    assert code == 0 and out.splitlines()[1].split("\t")[:2] == ["qa", "5"], err
    code, out, _ = run_eval(capsys, run / "checkpoint")
    assert code == 0 and out.splitlines()[0] == "task\tn\tacc\tacc_norm"
    assert out.splitlines()[1] == f"qa\t5\t{mine['acc']:.4f}\t{mine['acc_norm']:.4f}"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["{tmp}/nowhere", "--tasks", "bearing_qa"], "not a checkpoint directory"),
        (["{run}/checkpoint", "--tasks", "qa,hellaswag"], "unknown task 'hellaswag'"),
        (["{run}/checkpoint", "--tasks", "missing.yaml"], "task file not found"),
        (["{run}/checkpoint", "--tasks", "cloze", "--job", "{tmp}/none.yaml"], "--job"),
        (["{run}/checkpoint", "--tasks", "qa", "--limit", "0"], "--limit 0: must be at least 1"),
        (["{run}/checkpoint", "--tasks", "bad.jsonl"], "task file not found"),
    ],
    ids=["checkpoint", "unknown", "yaml", "job", "limit", "jsonl"],
)
def test_cascade_eval_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    run = job_folder(tmp_path, tokenizer())
    args = [a.format(tmp=tmp_path, run=run) for a in argv]
    code, out, err = run_eval(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


def test_cloze_needs_the_job_and_a_missing_lm_eval_says_how_to_install(
    tmp_path, capsys, monkeypatch
):
    ckpt = save_checkpoint(pruned_model(tokenizer()), tokenizer(), tmp_path / "ckpt")
    code, _, err = run_eval(capsys, ckpt, "--tasks", "cloze")
    assert code == 2 and "held-out test documents; pass --job" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    code, _, err = run_eval(capsys, ckpt, "--tasks", "bearing_qa")
    assert code == 2 and err.count("\n") == 1
    assert "pip install 'cascade-runner[eval]' (lm-eval==0.4.13)" in err
