"""Pruned checkpoints: per-layer layouts round-trip, vanilla loading, integrity, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import (
    padded_batch,
    prune_uniformly,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
    tiny_tokenizer,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

import stages.checkpoint as ckpt
from stages.arch import get_adapter
from stages.checkpoint import (
    CheckpointError,
    load_pruned,
    load_tokenizer,
    save_checkpoint,
    verify_manifest,
)

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert}


def logits(model, side="right"):
    ids, mask = padded_batch(side=side)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def heterogeneous(model):
    """Heads, channels and depth all pruned, differently per layer."""
    adapter = get_adapter(model)
    adapter.prune_attention(model, 0, [adapter.attn_units(model, 0) - 1])
    adapter.prune_mlp(model, 1, list(range(0, 48, 2)))
    adapter.prune_mlp(model, 2, [3, 9, 27])
    adapter.remove_layers(model, [1])
    return model


@pytest.mark.parametrize("family", list(BUILDERS))
def test_heterogeneous_layout_round_trips(family, tmp_path):
    model = heterogeneous(BUILDERS[family]())
    before = model.config.to_dict()
    path = save_checkpoint(
        model, tiny_tokenizer(), tmp_path / "ckpt", metadata={"stage": "channels"}
    )
    assert model.config.to_dict() == before  # the live config is never edited
    loaded = load_pruned(path, attn_implementation="eager")
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-6, rtol=0)
    assert get_adapter(loaded).layout(loaded) == get_adapter(model).layout(model)
    assert not loaded.training
    pruning = json.loads((path / "config.json").read_text())["pruning"]
    assert pruning["family"] == get_adapter(model).family and pruning["stage"] == "channels"
    assert pruning["uniform"] is False and pruning["vanilla_loadable"] is False
    assert len(pruning["layout"]) == 2 and pruning["layout"][1]["intermediate_size"] == 3
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest)
    with pytest.raises(CheckpointError, match="require_uniform"):
        save_checkpoint(model, None, tmp_path / "strict", require_uniform=True)
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize(
    ("family", "heads"), [("llama", True), ("qwen2", True), ("gpt2", False), ("bert", False)]
)
def test_uniform_layout_loads_with_plain_transformers(family, heads, tmp_path):
    model = prune_uniformly(BUILDERS[family](), heads=heads)
    path = save_checkpoint(model, None, tmp_path / "ckpt", require_uniform=True)
    assert json.loads((path / "config.json").read_text())["pruning"]["vanilla_loadable"] is True
    plain = AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager"
    ).eval()
    assert get_adapter(plain).layout(plain) == get_adapter(model).layout(model)
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_uniform_head_pruning_is_not_vanilla_for_mha_families(family, tmp_path):
    model = BUILDERS[family]()
    for i in range(3):
        get_adapter(model).prune_attention(model, i, [0, 1])
    with pytest.raises(CheckpointError, match="not expressible"):
        save_checkpoint(model, None, tmp_path / "ckpt", require_uniform=True)
    path = save_checkpoint(model, None, tmp_path / "ckpt")
    assert json.loads((path / "config.json").read_text())["pruning"]["uniform"] is True
    torch.testing.assert_close(
        logits(load_pruned(path, attn_implementation="eager")), logits(model), atol=1e-6, rtol=0
    )


def test_tied_causal_lm_sharded_round_trip(tmp_path):
    model = heterogeneous(tiny_llama(LlamaForCausalLM, tie_word_embeddings=True))
    path = save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt", max_shard_size="10KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    loaded = load_pruned(path, attn_implementation="eager", dtype=torch.float64)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.float64
    torch.testing.assert_close(logits(loaded).float(), logits(model), atol=1e-5, rtol=0)


def test_uniform_tied_causal_lm_loads_plainly(tmp_path):
    model = prune_uniformly(tiny_llama(LlamaForCausalLM, tie_word_embeddings=True), heads=True)
    path = save_checkpoint(
        model, None, tmp_path / "ckpt", require_uniform=True, max_shard_size="10KB"
    )
    plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(plain, "left"), logits(model, "left"), atol=1e-6, rtol=0)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_detects_tampering(tmp_path):
    model = tiny_gpt2()
    path = save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt")
    verify_manifest(path)
    _flip_byte(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="changed file model.safetensors"):
        load_pruned(path)
    path = save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt")
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing file tokenizer.json"):
        verify_manifest(path)
    path = save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt")
    (path / "notes.txt").write_text("extra")
    with pytest.raises(CheckpointError, match="unexpected file notes.txt"):
        verify_manifest(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="missing file manifest.json"):
        verify_manifest(path)
    assert isinstance(load_pruned(path, verify=False), torch.nn.Module)  # weights themselves fine


@pytest.mark.parametrize("failing", ["_write_manifest", "save_file"])
def test_failed_save_leaves_previous_checkpoint_intact(failing, tmp_path, monkeypatch):
    first = tiny_llama()
    path = save_checkpoint(first, tiny_tokenizer(), tmp_path / "ckpt")
    expected = logits(first, "left")
    second = heterogeneous(tiny_llama(seed=1))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, failing, boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(second, tiny_tokenizer(), path)
    verify_manifest(path)
    torch.testing.assert_close(logits(load_pruned(path), "left"), expected, atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp/backup dirs left


def test_save_replaces_existing_checkpoint(tmp_path):
    path = save_checkpoint(tiny_bert(), None, tmp_path / "ckpt")
    model = heterogeneous(tiny_bert(seed=3))
    save_checkpoint(model, None, path)
    assert len(json.loads((path / "config.json").read_text())["pruning"]["layout"]) == 2
    torch.testing.assert_close(logits(load_pruned(path)), logits(model), atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_metadata_and_peft_are_checked(tmp_path):
    model = tiny_gpt2()
    with pytest.raises(CheckpointError, match=r"\['layout'\] are reserved"):
        save_checkpoint(model, None, tmp_path / "a", metadata={"layout": 1})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(model, None, tmp_path / "b", metadata={"t": torch.zeros(1)})
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(CheckpointError, match="merge_and_unload"):
        save_checkpoint(wrapped, None, tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_tokenizer_round_trip_and_missing(tmp_path):
    tokenizer = tiny_tokenizer()
    path = save_checkpoint(tiny_gpt2(), tokenizer, tmp_path / "ckpt")
    text = "w5 w17 w99 unknown"
    assert load_tokenizer(path)(text)["input_ids"] == tokenizer(text)["input_ids"]
    bare = save_checkpoint(tiny_gpt2(), None, tmp_path / "bare")
    with pytest.raises(CheckpointError, match="no loadable tokenizer"):
        load_tokenizer(bare)


def test_load_rejects_non_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_pruned(tmp_path / "nope")
    path = save_checkpoint(tiny_gpt2(), None, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config["pruning"]["layout"][0]["intermediate_size"] = 40  # layout no longer matches weights
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match the saved layout"):
        load_pruned(path, verify=False)


def test_plain_transformers_refuses_a_heterogeneous_checkpoint(tmp_path):
    """No silent re-initialisation: vanilla loading of per-layer shapes fails loudly."""
    model = tiny_llama()
    get_adapter(model).prune_mlp(model, 1, [1, 2, 3])
    path = save_checkpoint(model, None, tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForSequenceClassification.from_pretrained(path)
