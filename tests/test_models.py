"""runner.models (loading, safetensors only, heads) and runner.demo_models (tokenizer, configs,
demo training + cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2Config

import runner.demo_models as demo
import runner.models as models
from runner.data.bearing import CLASS_NAMES, DataConfig
from runner.demo_models import (
    DEMO_MODELS,
    DemoModelError,
    build_tokenizer,
    demo_cache_key,
    demo_config,
    get_demo_model,
)
from runner.models import ModelError, describe_model, load_model
from stages.base import param_count

TEXTS = ["rms 0.3 kurt 14 env 4.7x", "rms 0.19 kurt 3.5", "rms 0.3 hf 0.84"]


def test_build_tokenizer_round_trip_specials_and_padding() -> None:
    tok = build_tokenizer(TEXTS)
    ids = tok(TEXTS[0])["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == TEXTS[0]
    assert tok("rms 9.99")["input_ids"][2] == tok.unk_token_id
    batch = tok(TEXTS, padding="longest")
    assert tok.padding_side == "right" and tok.pad_token_id == 0
    assert batch["input_ids"][1][-1] == tok.pad_token_id and batch["attention_mask"][1][-1] == 0
    assert len(tok) == 4 + len({w for t in TEXTS for w in t.split()})


def test_build_tokenizer_is_deterministic_and_order_independent() -> None:
    a = build_tokenizer(TEXTS).get_vocab()
    assert a == build_tokenizer(TEXTS).get_vocab()
    assert a == build_tokenizer(list(reversed(TEXTS))).get_vocab()
    assert a["rms"] == 4  # most frequent word right after the 4 specials


def test_build_tokenizer_survives_save_and_reload(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = build_tokenizer(TEXTS)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert (
        again(TEXTS, padding="longest")["input_ids"] == tok(TEXTS, padding="longest")["input_ids"]
    )
    assert again.pad_token_id == tok.pad_token_id and again.padding_side == "right"


def test_demo_registry_has_required_models() -> None:
    required = {"demo-gpt2-mha", "demo-llama-gqa", "demo-tiny-gpt2", "demo-tiny-llama"}
    required |= {f"demo-{fam}-{size}" for fam in ("gpt2", "llama") for size in "sml"}
    assert required <= set(DEMO_MODELS)
    gqa = DEMO_MODELS["demo-llama-gqa"]
    assert gqa.family == "llama" and gqa.kv_heads < gqa.heads and gqa.heads % gqa.kv_heads == 0


@pytest.mark.parametrize("name", ["demo-gpt2-mha", "demo-llama-gqa"])
def test_demo_configs_keep_embeddings_a_small_share(name: str) -> None:
    spec = DEMO_MODELS[name]
    config = demo_config(spec, 300, len(CLASS_NAMES), 0)
    assert config.problem_type == "single_label_classification"
    assert config.id2label[3] == CLASS_NAMES[3] and config.num_labels == len(CLASS_NAMES)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    embedding_params = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
    )
    assert embedding_params / param_count(model) < 0.06  # >= 8x total compression possible
    info = describe_model(model)
    expected = ("mha", "gelu") if spec.family == "gpt2" else ("gqa", "swiglu")
    assert (info["attention"], info["mlp"]) == expected
    assert info["params"] == param_count(model) and info["architecture"].endswith("Classification")


# ----------------------------------------------------------------------------- load_model


def _save_tiny_gpt2(path: Path, vocab_size: int | None = None) -> None:
    tok = build_tokenizer(TEXTS)
    cfg = GPT2Config(
        vocab_size=vocab_size or len(tok), n_positions=16, n_embd=16, n_layer=1, n_head=2,
        num_labels=3, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(ModelError, match="model_type"):
        load_model(str(weird))
    (weird / "config.json").write_text("{oops")
    with pytest.raises(ModelError, match="invalid JSON"):
        load_model(str(weird))
    _save_tiny_gpt2(tmp_path / "small_vocab", vocab_size=6)
    with pytest.raises(ModelError, match="vocab"):
        load_model(str(tmp_path / "small_vocab"))


def test_load_model_from_local_dir_and_remote_code_warning(tmp_path, capsys) -> None:
    _save_tiny_gpt2(tmp_path)
    model, tok = load_model(str(tmp_path), trust_remote_code=True)
    assert "trust_remote_code" in capsys.readouterr().err
    assert model.config.num_labels == 3 and model.config.pad_token_id == tok.pad_token_id
    relabelled, _ = load_model(str(tmp_path), num_labels=5, dtype="bfloat16")
    assert relabelled.score.weight.shape[0] == 5 and relabelled.dtype == torch.bfloat16


def test_load_model_uses_load_pruned_for_pruned_checkpoints(tmp_path, monkeypatch) -> None:
    _save_tiny_gpt2(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"pruning": {"layers": []}}))
    calls: list[Path] = []

    def fake_load_pruned(path, dtype=None):
        calls.append(Path(path))
        return AutoModelForSequenceClassification.from_pretrained(path)

    monkeypatch.setattr(models, "load_pruned", fake_load_pruned)
    model, _ = load_model(str(tmp_path))
    assert calls == [tmp_path] and model.config.num_labels == 3


# ----------------------------------------------------------------------------- demo models


def test_cache_key_tracks_data_config_and_spec() -> None:
    spec = DEMO_MODELS["demo-tiny-gpt2"]
    base = demo_cache_key(spec, DataConfig())
    assert base == demo_cache_key(spec, DataConfig())
    assert base != demo_cache_key(spec, DataConfig(seed=1))
    assert base != demo_cache_key(DEMO_MODELS["demo-tiny-llama"], DataConfig())
    assert len(base) == 12


TINY_DATA = DataConfig(samples_per_class_per_load=4, window=1024, calibration_size=8)


def test_demo_tiny_model_trains_caches_and_reloads_identically(tmp_path, monkeypatch, capsys):
    model, tok = get_demo_model("demo-tiny-llama", cache_dir=tmp_path, data_cfg=TINY_DATA)
    assert "dense test accuracy" in capsys.readouterr().err
    (cached,) = [p for p in tmp_path.iterdir()]  # no temp dirs left behind
    assert (
        cached.name
        == f"demo-tiny-llama-{demo_cache_key(DEMO_MODELS['demo-tiny-llama'], TINY_DATA)}"
    )
    assert (cached / "model.safetensors").is_file()
    assert describe_model(model)["name"] == "demo-tiny-llama"

    def no_training(*args, **kwargs):
        raise AssertionError("cache hit must not retrain")

    monkeypatch.setattr(demo, "train_steps", no_training)
    again, tok2 = get_demo_model(
        "demo-tiny-llama", cache_dir=tmp_path, data_cfg=TINY_DATA, progress=False
    )
    assert tok2.get_vocab() == tok.get_vocab()
    batch = tok(["rms 0.3 kurt 14", "hf 0.84"], padding="longest", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
    assert describe_model(again)["name"] == "demo-tiny-llama"


def test_load_model_routes_demo_names_and_checks_labels(monkeypatch) -> None:
    seen: dict = {}

    def fake_demo(name, *, cache_dir=None, progress=True, data_cfg=None):
        seen.update(name=name, cache_dir=cache_dir, progress=progress, data_cfg=data_cfg)
        cfg = demo_config(DEMO_MODELS[name], 20, len(CLASS_NAMES), 0)
        return AutoModelForSequenceClassification.from_config(cfg), build_tokenizer(TEXTS)

    monkeypatch.setattr(models, "get_demo_model", fake_demo)
    model, _ = load_model(
        "demo-tiny-gpt2", cache_dir="/x", progress=False, dtype="bfloat16", data_cfg="D"
    )
    assert seen == {"name": "demo-tiny-gpt2", "cache_dir": "/x", "progress": False, "data_cfg": "D"}
    assert model.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="labels"):
        load_model("demo-tiny-gpt2", num_labels=3)


def test_atomic_save_tolerates_a_racing_writer(tmp_path: Path) -> None:
    _save_tiny_gpt2(tmp_path / "src")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "src")
    tok = build_tokenizer(TEXTS)
    target = tmp_path / "cache" / "demo-x-123"
    demo._save_atomically(model, tok, target, {"who": "first"}, replace=False)
    demo._save_atomically(model, tok, target, {"who": "second"}, replace=False)  # lost the race
    assert json.loads((target / demo._MARKER).read_text())["who"] == "first"
    assert [p.name for p in target.parent.iterdir()] == ["demo-x-123"]


def test_unknown_demo_name_is_a_user_error() -> None:
    with pytest.raises(DemoModelError, match="unknown demo model"):
        get_demo_model("demo-nope")


def test_new_head_init_depends_on_the_seed_not_on_the_callers_rng(tmp_path: Path) -> None:
    _save_tiny_gpt2(tmp_path)
    heads = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever ran before in this process
        model, _ = load_model(str(tmp_path), num_labels=5, seed=0)
        heads.append(model.score.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    before = torch.random.get_rng_state()
    other, _ = load_model(str(tmp_path), num_labels=5, seed=1)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is untouched
    assert not torch.equal(heads[0], other.score.weight)
