"""Perplexity on a local text file: LM head from the source checkpoint, cross-checked with transformers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_job
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from runner.config import ConfigError, parse_config
from runner.data.bearing import DataConfig, build_dataset
from runner.demo_models import build_tokenizer
from runner.errors import JobError
from runner.job import run_job
from runner.lm_head import load_lm_head, read_token_ids
from stages.lm_eval import next_token_nll, perplexity, token_windows

WINDOW = 24


def _texts() -> list[str]:
    data = build_dataset(DataConfig(samples_per_class_per_load=2, calibration_size=8))
    return [t for split in data.values() for t in split["text"]]


def _save_causal_lm(path: Path, family: str) -> Path:
    tok = build_tokenizer(_texts())
    common = {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    torch.manual_seed(0)
    if family == "gpt2":  # tied head
        model = GPT2LMHeadModel(
            GPT2Config(n_embd=32, n_head=4, n_layer=2, n_inner=48, n_positions=64, **common)
        )
    else:  # untied head, read from the safetensors file by name
        config = LlamaConfig(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=False, **common,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    with torch.no_grad():  # make the head differ from the embeddings so a mix-up shows
        model.get_output_embeddings().weight.mul_(1.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _text_file(tmp_path: Path) -> Path:
    file = tmp_path / "notes.txt"
    file.write_text("\n".join(_texts()[:6]), encoding="utf-8")
    return file


# ----------------------------------------------------------------------------- pure maths
def test_token_windows_and_nll() -> None:
    ids = torch.arange(10)
    assert [c.tolist() for c in token_windows(ids, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(token_windows(torch.arange(9), 4)) == 2  # a 1-token tail predicts nothing
    with pytest.raises(ValueError, match=">= 2"):
        token_windows(ids, 1)
    with_bos = token_windows(torch.arange(1, 8), 4, bos=0)  # every window opens with BOS
    assert [c.tolist() for c in with_bos] == [[0, 1, 2, 3], [0, 4, 5, 6], [0, 7]]
    uniform = torch.zeros(5, 7)
    nll, n = next_token_nll(uniform, torch.tensor([1, 2, 3, 4, 5]))
    assert n == 4 and nll == pytest.approx(4 * math.log(7))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_perplexity_matches_the_causal_lm_itself(tmp_path, family) -> None:
    path = _save_causal_lm(tmp_path / family, family)
    lm = (GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM).from_pretrained(path).eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    head = load_lm_head(path, family)
    assert (head.weight is None) == (family == "gpt2")
    tok = build_tokenizer(_texts())
    ids = read_token_ids(_text_file(tmp_path), tok, 10_000)
    ours = perplexity(classifier, head.bind(classifier), ids, window=WINDOW, bos=tok.bos_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in token_windows(ids, WINDOW, tok.bos_token_id):
            loss = lm(input_ids=chunk[None], labels=chunk[None]).loss
            total, count = total + float(loss) * (chunk.numel() - 1), count + chunk.numel() - 1
    assert ours["tokens"] == count
    assert ours["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_perplexity_refuses_models_without_lm_head(tmp_path) -> None:
    tok = build_tokenizer(_texts())
    path = tmp_path / "clf"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_head=2, n_layer=1, n_positions=64))
    AutoModelForSequenceClassification.from_config(
        GPT2Config(
            vocab_size=len(tok), n_embd=16, n_head=2, n_layer=1, n_positions=64, num_labels=3
        )
    ).save_pretrained(path)
    with pytest.raises(JobError, match="not a causal-LM checkpoint"):
        load_lm_head(path, "clf")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(JobError, match="fewer than 2 tokens"):
        read_token_ids(empty, tok, 100)


def test_config_checks_the_file(tmp_path) -> None:
    raw = tiny_job(evaluation={"perplexity_file": str(tmp_path / "missing.txt")})
    with pytest.raises(ConfigError, match="evaluation.perplexity_file: file not found"):
        parse_config(raw)


@pytest.mark.slow
def test_job_reports_dense_and_final_perplexity(tmp_path) -> None:
    path = _save_causal_lm(tmp_path / "lm", "llama")
    raw = tiny_job(
        str(path),
        evaluation={"perplexity_file": str(_text_file(tmp_path)), "perplexity_window": WINDOW},
    )
    raw["sia"] = {"enabled": False}
    (report,) = run_job(parse_config(raw), tmp_path / "out", log=lambda m: None).values()
    ppl = report["final"]["perplexity"]
    assert ppl["tokens"] > 100 and ppl["window"] == WINDOW
    assert math.isfinite(ppl["perplexity"]) and ppl["perplexity"] != pytest.approx(ppl["dense"])
    assert "Perplexity on" in (tmp_path / "out" / "report.md").read_text()
    assert f"{ppl['perplexity']:.2f}" in (tmp_path / "out" / "report.html").read_text()
    too_wide = tiny_job(
        str(path),
        evaluation={"perplexity_file": str(_text_file(tmp_path)), "perplexity_window": 65},
    )
    with pytest.raises(JobError, match="exceed model .* 64 positions"):
        run_job(parse_config(too_wide), tmp_path / "wide", log=lambda m: None)
    demo = tiny_job(evaluation={"perplexity_file": str(_text_file(tmp_path))})
    with pytest.raises(JobError, match="no language-model head"):
        run_job(parse_config(demo), tmp_path / "demo", log=lambda m: None)
