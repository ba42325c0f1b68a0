"""`cascade export`: hf folders plain transformers loads, GGUF files llama.cpp (and transformers) load.

Tiny causal Llama-family models with a real byte-level BPE tokenizer trained here, saved with
stages.checkpoint.save_checkpoint; every refusal is one line and leaves nothing at the output.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from tiny_models import (
    prune_uniformly,
    prune_units,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2ForCausalLM,
)

import runner.exporters.gguf as gguf_export
from runner.cli.export import main as export_main
from runner.exporters import EXPORT_FORMATS, ExportError, describe_layout, export_checkpoint
from stages.arch import get_adapter
from stages.checkpoint import save_checkpoint

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes layers, attention heads and FFN channels from a model.",
    "What is the capital of France? The capital of France is Paris.",
    "llama.cpp loads GGUF files; transformers loads safetensors folders.",
    "In 2024 there were 12345 cats, 678 dogs and 9 birds.",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDS = torch.tensor([[1, 40, 71, 300, 5, 99, 120, 7, 260, 33, 2, 64]])


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE (~320 tokens) with ChatML special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def unpermute_rows(tensor, n_head: int):
    """Inverse of gguf.permute_rows, as transformers' GGUF loader undoes it."""
    rows = tensor.shape[0]
    return (
        tensor.reshape(n_head, rows // n_head // 2, 2, *tensor.shape[1:])
        .transpose(1, 2)
        .reshape(tensor.shape)
    )


def causal(builder=tiny_llama, cls=LlamaForCausalLM, vocab=None, **overrides):
    return builder(cls, vocab_size=vocab, **overrides)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def per_layer(model):
    """Layer 0: 1 KV group (2 heads) + 40 channels; layer 1 dense heads + 48; layer 2: 1 + 30."""
    adapter = get_adapter(model)
    prune_units(
        adapter,
        model,
        {0: [1], 2: [0]},
        {0: list(range(40)), 2: list(range(3, 33))},
    )
    return model


def run_cli(capsys, *argv):
    code = export_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *needles: str):
    errors = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


# ---- gguf ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "builder, cls, overrides",
    [
        (tiny_llama, LlamaForCausalLM, {}),
        (tiny_mistral, MistralForCausalLM, {"sliding_window": None}),
        (tiny_qwen2, Qwen2ForCausalLM, {"use_sliding_window": False}),
    ],
    ids=["llama", "mistral", "qwen2"],
)
@pytest.mark.parametrize("dtype, tol", [("f32", 1e-5), ("f16", 1e-2)])
def test_uniform_gguf_reloads_in_transformers(
    tmp_path, tokenizer, builder, cls, overrides, dtype, tol
):
    model = causal(builder, cls, len(tokenizer), **overrides)
    # Llama/Mistral: one KV group of 2 heads left, so head_dim 8 != hidden / heads = 16 (the
    # file must say key_length); Qwen2 cannot express pruned heads, so only FFN and depth there
    prune_uniformly(model, heads=builder is not tiny_qwen2)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    out = export_checkpoint(ckpt, "gguf", tmp_path / "model.gguf", dtype=dtype, log=lambda _: None)

    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=out.name, dtype=torch.float32
    )
    # llama.cpp (and so transformers' GGUF loader) reads a Mistral as `llama`: same logits
    assert type(reloaded) is (Qwen2ForCausalLM if cls is Qwen2ForCausalLM else LlamaForCausalLM)
    expected = logits(model)
    scale = expected.abs().max()
    torch.testing.assert_close(logits(reloaded), expected, atol=tol * scale, rtol=tol)
    reader = gguf.GGUFReader(out)
    arch = reader.fields["general.architecture"].contents()
    assert arch == ("qwen2" if builder is tiny_qwen2 else "llama")
    assert reader.fields[f"{arch}.attention.key_length"].contents() == 8  # hidden 32 / 4 heads


def test_gguf_tokenizer_fields_match_the_checkpoint(tmp_path, tokenizer):
    model = causal(vocab=len(tokenizer) + 4)  # embedding rows beyond the tokenizer: padded
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    out = export_checkpoint(ckpt, "gguf", tmp_path / "m.gguf", log=lambda _: None)
    fields = gguf.GGUFReader(out).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    vocab = tokenizer.get_vocab()
    assert len(tokens) == len(tokenizer) + 4
    assert all(tokens[i] == tok for tok, i in vocab.items())
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]"
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[vocab["<|im_start|>"]] == 3 and types[vocab["Ġthe"]] == 1 and types[-1] == 5
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    merges = json.loads((ckpt / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"].contents() == [" ".join(m) for m in merges]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == vocab["<|im_start|>"]
    assert fields["tokenizer.ggml.eos_token_id"].contents() == vocab["<|im_end|>"]
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    # transformers rebuilds the same tokenizer from these fields
    reloaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = "What is the capital of France? 12345 cats."
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_per_layer_gguf_round_trips_every_tensor_and_layer_value(tmp_path, tokenizer):
    model = per_layer(causal(vocab=len(tokenizer)))
    layouts = get_adapter(model).layout(model)
    assert len(set(layouts)) == 3
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    out = export_checkpoint(ckpt, "gguf", tmp_path / "m.gguf", dtype="f32", log=lambda _: None)

    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "deci"
    assert fields["deci.block_count"] == 3
    assert fields["deci.attention.head_count"] == [x.num_heads for x in layouts] == [2, 4, 2]
    assert fields["deci.attention.head_count_kv"] == [x.num_kv_heads for x in layouts]
    assert fields["deci.feed_forward_length"] == [x.intermediate_size for x in layouts]
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 8
    assert fields["deci.rope.dimension_count"] == 8

    state = model.state_dict()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, 3)
    to_hf = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in state}
    assert {t.name for t in reader.tensors} == set(to_hf)
    for tensor in reader.tensors:
        hf_name = to_hf[tensor.name]
        data = torch.from_numpy(np.array(tensor.data))
        layer = int(hf_name.split(".")[2]) if ".layers." in hf_name else None
        if hf_name.endswith("q_proj.weight"):
            data = unpermute_rows(data, layouts[layer].num_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = unpermute_rows(data, layouts[layer].num_kv_heads)
        assert torch.equal(data, state[hf_name]), hf_name


def test_permutation_is_its_own_inverse_per_head():
    rows = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)
    permuted = gguf_export.permute_rows(rows, 2)
    assert not torch.equal(permuted, rows)
    assert torch.equal(unpermute_rows(permuted, 2), rows)
    # each head's block of rows stays in place: slicing heads commutes with the permutation
    assert torch.equal(gguf_export.permute_rows(rows[8:], 1), permuted[8:])


# ---- hf --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_uniform_hf_export_loads_with_plain_transformers(tmp_path, tokenizer, dtype):
    model = prune_uniformly(causal(vocab=len(tokenizer)), heads=True)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    out = export_checkpoint(ckpt, "hf", tmp_path / "hf", dtype=dtype, log=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    assert "pruning" not in config
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    if dtype is None:  # same weights, same attention kernel as the source: bit-identical
        assert torch.equal(logits(loaded), logits(model))
    else:
        assert loaded.dtype == torch.bfloat16 and config["dtype"] == "bfloat16"
        torch.testing.assert_close(logits(loaded.float()), logits(model), atol=0.1, rtol=0.05)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE


def test_sharded_checkpoint_exports_to_both_formats(tmp_path, tokenizer):
    model = prune_uniformly(causal(vocab=len(tokenizer)), heads=True)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt", max_shard_size="20KB")
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1
    out = export_checkpoint(ckpt, "hf", tmp_path / "hf", dtype="f32", log=lambda _: None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert torch.equal(logits(loaded), logits(model))
    gguf_file = export_checkpoint(ckpt, "gguf", tmp_path / "m.gguf", dtype="f32", log=print)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-4, rtol=1e-4)


def test_per_layer_hf_export_is_refused_with_the_layer_list(tmp_path, tokenizer, capsys):
    ckpt = save_checkpoint(per_layer(causal(vocab=len(tokenizer))), tokenizer, tmp_path / "ckpt")
    code, out, err = run_cli(capsys, ckpt, "--format", "hf", "-o", tmp_path / "hf")
    assert code == 2 and out == ""
    assert_one_line_error(
        err,
        "layers 0,2 have 2 heads / 1 KV heads, layer 1 have 4 / 2",
        "FFN widths 30..48",
        "target.layout: uniform",
    )
    assert not (tmp_path / "hf").exists() and leftovers(tmp_path) == []


def test_describe_layout_groups_layers_into_ranges():
    layouts = [{"num_heads": 9, "num_kv_heads": 3, "intermediate_size": 1536}] * 3
    layouts = [{"num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1344}] + layouts
    assert describe_layout(layouts) == (
        "layer 0 have 6 heads / 2 KV heads, layers 1-3 have 9 / 3; FFN widths 1344..1536"
    )


# ---- bad input: one line, exit 2, nothing at the output ---------------------------------------
def _tampered(ckpt):
    with open(ckpt / "model.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    return ckpt


CASES = {
    "gpt2": (lambda tok: tiny_gpt2(GPT2LMHeadModel, vocab_size=len(tok)), True, "supports Llama"),
    "classifier": (lambda tok: tiny_llama(LlamaForSequenceClassification), True, "causal LM"),
    "no tokenizer": (lambda tok: tiny_llama(LlamaForCausalLM), False, "no tokenizer.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unsupported_checkpoints_are_refused(tmp_path, tokenizer, capsys, case):
    build, with_tokenizer, needle = CASES[case]
    ckpt = save_checkpoint(build(tokenizer), tokenizer if with_tokenizer else None, tmp_path / "c")
    code, _, err = run_cli(capsys, ckpt, "--format", "gguf", "-o", tmp_path / "m.gguf")
    assert code == 2
    assert_one_line_error(err, needle, str(ckpt))
    assert not (tmp_path / "m.gguf").exists() and leftovers(tmp_path) == []


def test_tampered_checkpoint_is_refused_unless_no_verify(tmp_path, tokenizer, capsys):
    ckpt = _tampered(save_checkpoint(causal(vocab=len(tokenizer)), tokenizer, tmp_path / "c"))
    target = tmp_path / "m.gguf"
    code, _, err = run_cli(capsys, ckpt, "--format", "gguf", "-o", target)
    assert code == 2
    assert_one_line_error(err, "changed file model.safetensors", "--no-verify")
    assert not target.exists() and leftovers(tmp_path) == []
    code, out, err = run_cli(capsys, ckpt, "--format", "gguf", "-o", target, "--no-verify")
    assert code == 0 and out.strip() == str(target) and target.is_file()
    assert "NOT checked against its manifest" in err


def test_unwritable_output_is_refused(tmp_path, tokenizer, capsys):
    ckpt = save_checkpoint(causal(vocab=len(tokenizer)), tokenizer, tmp_path / "c")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for target, needle in (
        (blocker / "m.gguf", "does not exist"),
        (tmp_path / "missing" / "m.gguf", "does not exist"),
        (tmp_path / "c", "is the checkpoint itself"),
    ):
        code, _, err = run_cli(capsys, ckpt, "--format", "gguf", "-o", target)
        assert code == 2
        assert_one_line_error(err, needle)
    assert leftovers(tmp_path) == [] and not (tmp_path / "missing").exists()


def test_a_failure_while_writing_leaves_no_partial_file(tmp_path, tokenizer, monkeypatch):
    ckpt = save_checkpoint(causal(vocab=len(tokenizer)), tokenizer, tmp_path / "c")
    target = tmp_path / "m.gguf"
    target.write_bytes(b"GGUF previous export")
    calls = []

    def failing(tensor, dtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(tensor, dtype)

    real = gguf_export._as_numpy
    monkeypatch.setattr(gguf_export, "_as_numpy", failing)
    with pytest.raises(ExportError, match="cannot write .*No space left on device"):
        export_checkpoint(ckpt, "gguf", target, force=True, log=lambda _: None)
    assert target.read_bytes() == b"GGUF previous export" and leftovers(tmp_path) == []


def test_registry_names_the_formats():
    from runner.exporters import get_exporter

    assert EXPORT_FORMATS == ("hf", "gguf")
    assert get_exporter("gguf", tokenizer_pre="llama-bpe").tokenizer_pre == "llama-bpe"
    with pytest.raises(ExportError, match="unknown export format 'onnx'; known formats: hf, gguf"):
        get_exporter("onnx")
