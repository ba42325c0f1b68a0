"""Sharded export: layer-range shards merged into one checkpoint equal to save_checkpoint's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import padded_batch, tiny_gpt2, tiny_llama, tiny_tokenizer

from cluster.shards import (
    ShardExportError,
    assign_tensors,
    export_sharded,
    layer_ranges,
    layers_prefix,
)
from stages.arch import get_adapter
from stages.checkpoint import INDEX, load_pruned, save_checkpoint, verify_manifest


def heterogeneous(model, *, drop_layer: bool = False):
    """Different head / channel counts per layer; optionally a layer dropped (3 -> 2 layers)."""
    adapter = get_adapter(model)
    adapter.prune_attention(model, 0, [adapter.attn_units(model, 0) - 1])
    adapter.prune_mlp(model, 1, list(range(0, 48, 2)))
    adapter.prune_mlp(model, 2, [3, 9, 27])
    if drop_layer:
        adapter.remove_layers(model, [1])
    return model


def tensors_of(directory) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                assert name not in out, f"{name} stored twice"
                out[name] = handle.get_tensor(name)
    return out


def logits(model):
    ids, mask = padded_batch(side="right")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_layer_ranges_are_contiguous_and_balanced():
    assert layer_ranges(5, 2) == [range(0, 3), range(3, 5)]
    assert layer_ranges(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert layer_ranges(2, 4) == [range(0, 1), range(1, 2)]  # never an empty shard
    with pytest.raises(ShardExportError, match="need >= 1"):
        layer_ranges(0, 2)


def test_assign_tensors_puts_embeddings_first_and_head_last():
    model = tiny_llama()
    names = list(model.state_dict())
    plan = assign_tensors(names, layers_prefix(model), 3, 2)
    assert sorted(sum(plan, [])) == sorted(names)  # every tensor exactly once
    assert "model.embed_tokens.weight" in plan[0]
    assert {"model.norm.weight", "score.weight"} <= set(plan[1])
    assert all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in plan[0][1:])
    assert all(not n.startswith(("model.layers.0.", "model.layers.1.")) for n in plan[1])


@pytest.mark.parametrize(
    "build, dtype, drop, workers, shards",
    [(tiny_gpt2, torch.float32, False, 3, 3), (tiny_llama, torch.bfloat16, True, 4, 2)],
    ids=["gpt2-fp32-3-shards", "llama-bf16-more-workers-than-layers"],
)
def test_sharded_export_equals_single_process_checkpoint(
    tmp_path, build, dtype, drop, workers, shards
):
    model = heterogeneous(build(), drop_layer=drop).to(dtype)
    tokenizer = tiny_tokenizer()
    single = save_checkpoint(model, tokenizer, tmp_path / "single")
    sharded = export_sharded(model, tokenizer, tmp_path / "sharded", workers)

    verify_manifest(sharded)
    files = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    index = json.loads((sharded / INDEX).read_text())
    assert set(index["weight_map"].values()) == set(files)

    expected, got = tensors_of(single), tensors_of(sharded)
    assert list(sorted(got)) == list(sorted(expected))
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    # each shard file holds exactly the tensors the index says
    for name, file in index["weight_map"].items():
        with safe_open(str(sharded / file), framework="pt") as handle:
            assert name in handle.keys()

    config_single = json.loads((single / "config.json").read_text())
    assert json.loads((sharded / "config.json").read_text()) == config_single
    assert config_single["pruning"]["uniform"] is False
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (sharded / name).read_bytes() == (single / name).read_bytes()

    loaded = load_pruned(sharded, attn_implementation="eager")
    reference = load_pruned(single, attn_implementation="eager")
    assert torch.equal(logits(loaded), logits(reference))
    if dtype == torch.float32:  # a bf16 live model keeps bf16 rotary buffers: compare in fp32 only
        assert torch.equal(logits(loaded), logits(model))


def test_sharded_export_refuses_bad_input(tmp_path):
    with pytest.raises(ShardExportError, match="workers must be >= 1"):
        export_sharded(tiny_gpt2(), None, tmp_path / "x", 0)
    assert not (tmp_path / "x").exists()


@pytest.mark.ray
def test_ray_workers_write_the_same_bytes(tmp_path, shared_ray):
    class FakeRayExecutor:  # anything that is not a LocalExecutor routes writes to Ray tasks
        workers = 2

    model = heterogeneous(tiny_llama(), drop_layer=True)
    local = export_sharded(model, tiny_tokenizer(), tmp_path / "local", 2)
    remote = export_sharded(model, tiny_tokenizer(), tmp_path / "remote", 2, FakeRayExecutor())
    manifest = lambda d: json.loads((d / "manifest.json").read_text())  # noqa: E731
    assert manifest(remote) == manifest(local)  # sha256 + size of every file
    assert not list(tmp_path.glob(".*staging*"))  # staging dirs cleaned up
