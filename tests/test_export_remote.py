"""`cascade export --format hf --remote-code`: per-layer layouts that any Hugging Face tool loads.

Tiny causal Llama / Qwen2 (sliding-window layers) / Mistral models are pruned unevenly with the
adapters (one layer dropped, a KV group and FFN channels removed in some layers only), saved with
save_checkpoint and exported; AutoModelForCausalLM(trust_remote_code=True), a pipeline and peft
must give the source model's logits and greedy tokens exactly. Our own loader reads the same
folder without ever importing the shipped modeling file.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import prune_units, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2, tiny_tokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    pipeline,
)

from runner.cli.export import main as export_main
from runner.exporters import ExportError, export_checkpoint, get_exporter
from runner.exporters import modeling_cascade as modeling
from stages.arch import get_adapter
from stages.checkpoint import load_pruned, save_checkpoint

IDS = torch.tensor(
    [[5, 40, 71, 30, 5, 99, 12, 7, 26, 33, 8, 64], [9, 9, 17, 4, 4, 50, 61, 2, 3, 80, 81, 82]]
)
FAMILIES = {
    "llama": (tiny_llama, LlamaForCausalLM),
    "qwen2": (tiny_qwen2, Qwen2ForCausalLM),
    "mistral": (tiny_mistral, MistralForCausalLM),
}


def uneven(family: str):
    """Layer 1 dropped; then layer 0: 1 KV group + 40 channels, layer 1 (was 2): all heads + 30."""
    builder, cls = FAMILIES[family]
    model = builder(cls)
    adapter = get_adapter(model)
    prune_units(adapter, model, {0: [1]}, {0: list(range(40)), 2: list(range(3, 33))})
    adapter.remove_layers(model, [1])
    assert [(x.num_heads, x.intermediate_size) for x in adapter.layout(model)] == [(2, 40), (4, 30)]
    return model


def exported(tmp_path, model, **kwargs):
    ckpt = save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt")
    exporter = get_exporter("hf", remote_code=True)
    return export_checkpoint(ckpt, exporter, tmp_path / "hf", log=lambda _: None, **kwargs)


def remote(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, attn_implementation="eager", **kwargs
    ).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def greedy(model, ids=IDS[:1]):
    return model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_remote_code_folder_loads_with_identical_logits_and_cached_generation(tmp_path, family):
    model = uneven(family)
    folder = exported(tmp_path, model)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == family and config["auto_map"]["AutoModelForCausalLM"] == (
        f"modeling_cascade.Cascade{model.__class__.__name__}"
    )
    assert config["per_layer"] == [
        {"num_heads": 2, "num_kv_heads": 1, "intermediate_size": 40},
        {"num_heads": 4, "num_kv_heads": 2, "intermediate_size": 30},
    ]
    assert (folder / "modeling_cascade.py").read_bytes() == open(modeling.__file__, "rb").read()
    loaded = remote(folder)
    assert type(loaded).__name__.startswith("Cascade")
    assert torch.equal(logits(loaded), logits(model))
    # 10 new tokens on a 12-token prompt: the cache crosses Qwen2's / Mistral's sliding windows
    assert torch.equal(greedy(loaded), greedy(model))
    no_cache = model.generate(IDS[:1], max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(greedy(loaded), no_cache)


def test_plain_transformers_without_remote_code_refuses_rather_than_guessing(tmp_path):
    folder = exported(tmp_path, uneven("llama"))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_pipeline_and_peft_load_the_folder(tmp_path):
    # llama: transformers 5 reloads a generic tokenizer saved beside a qwen2 config as an empty
    # Qwen2Tokenizer, whatever the model folder (source checkpoint included)
    model = uneven("llama")
    folder = exported(tmp_path, model)
    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    out = generator("w5 w40 w71", max_new_tokens=6, do_sample=False, return_tensors=True)
    prompt = tiny_tokenizer()("w5 w40 w71", return_tensors="pt")["input_ids"]
    assert out[0]["generated_token_ids"] == greedy(model, prompt)[0, :9].tolist()
    lora = get_peft_model(remote(folder), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert torch.equal(logits(lora), logits(model))  # LoRA's B starts at zero
    assert lora.get_nb_trainable_parameters()[0] == 4 * sum(
        layer.self_attn.q_proj.in_features + layer.self_attn.q_proj.out_features
        + layer.mlp.down_proj.in_features + layer.mlp.down_proj.out_features
        for layer in model.model.layers
    )  # fmt: skip


def test_load_pruned_reads_the_folder_without_running_its_code(tmp_path):
    model = uneven("mistral")
    folder = exported(tmp_path, model)
    marker = tmp_path / "code-ran"
    with open(folder / "modeling_cascade.py", "a") as handle:
        handle.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    loaded = load_pruned(folder, verify=False, attn_implementation="eager")
    assert type(loaded) is MistralForCausalLM and torch.equal(logits(loaded), logits(model))
    assert AutoConfig.from_pretrained(folder, trust_remote_code=False).__class__.__module__ == (
        "transformers.models.mistral.configuration_mistral"
    )
    assert not marker.exists()
    remote(folder)  # the shipped file IS live code for trust_remote_code=True: the marker shows it
    assert marker.exists()


def test_default_hf_export_ships_no_code(tmp_path):
    model = uneven("llama")
    folder = exported(tmp_path, model)
    # re-export of the remote-code folder: a uniform-or-not check first, and never a .py or auto_map
    with pytest.raises(ExportError, match="cannot export as plain hf"):
        export_checkpoint(folder, "hf", tmp_path / "plain", log=lambda _: None)
    uniform = tiny_llama(LlamaForCausalLM)
    get_adapter(uniform).remove_layers(uniform, [1])
    source = exported(tmp_path / "u", uniform)
    plain = export_checkpoint(source, "hf", tmp_path / "plain", log=lambda _: None)
    config = json.loads((plain / "config.json").read_text())
    assert not list(plain.glob("*.py")) and "auto_map" not in config and "pruning" not in config
    vanilla = AutoModelForCausalLM.from_pretrained(plain, attn_implementation="eager").eval()
    assert type(vanilla) is LlamaForCausalLM and torch.equal(logits(vanilla), logits(uniform))


@pytest.mark.parametrize(
    "build, args, needle",
    [
        (lambda: tiny_gpt2(GPT2LMHeadModel), ["--format", "hf"], "llama family"),
        (lambda: tiny_llama(LlamaForSequenceClassification), ["--format", "hf"], "causal LMs"),
        (lambda: tiny_llama(LlamaForCausalLM), ["--format", "gguf"], "--format hf only"),
    ],
    ids=["gpt2", "classifier", "gguf"],
)
def test_unsupported_remote_code_exports_are_one_line_refusals(
    tmp_path, capsys, build, args, needle
):
    ckpt = save_checkpoint(build(), tiny_tokenizer(), tmp_path / "ckpt")
    code = export_main([str(ckpt), *args, "--remote-code", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_bad_per_layer_list_is_named():
    config = modeling.CascadeLlamaConfig(num_hidden_layers=2, per_layer=[{"num_heads": 3}])
    with pytest.raises(ValueError, match=r"per_layer must list one shape per layer \(2\)"):
        modeling.check_per_layer(config)
    config.per_layer = [{"num_heads": 3, "num_kv_heads": 2, "intermediate_size": 8}] * 2
    with pytest.raises(ValueError, match=r"per_layer\[0\]"):
        modeling.check_per_layer(config)
