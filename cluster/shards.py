"""Sharded export: each worker writes the safetensors shard of the layers it owns; the driver merges.

Shard k of n holds a contiguous range of layers; the tensors before the first layer (embeddings)
go with the first shard and those after the last layer (final norm, classifier head) with the
last. The driver turns the staged shards into ONE Hugging Face directory: model-0000k-of-0000n
.safetensors + model.safetensors.index.json, the config.json (with the "pruning" section),
tokenizer and manifest.json that stages.checkpoint.save_checkpoint writes, so `load_pruned`
(and plain transformers, for vanilla layouts) read it unchanged. With a Ray executor the shard
writes are Ray tasks; without one they run in-process and produce the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

from cluster.executor import LocalExecutor
from stages.arch import get_adapter
from stages.checkpoint import (
    INDEX,
    checkpoint_directory,
    pruning_config,
    weights_to_save,
    write_metadata,
)


class ShardExportError(ValueError):
    """A sharded export cannot run (bad worker count, no Ray for a Ray executor, peft model)."""


def shard_filename(k: int, n: int) -> str:
    """Hugging Face's shard name for shard k (0-based) of n."""
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def layer_ranges(n_layers: int, parts: int) -> list[range]:
    """`parts` contiguous, near-equal layer ranges (the first ones one longer when uneven)."""
    if n_layers < 1 or parts < 1:
        raise ShardExportError(f"layer_ranges: need >= 1 layer and part, got {n_layers}, {parts}")
    parts = min(parts, n_layers)
    size, extra = divmod(n_layers, parts)
    starts = [k * size + min(k, extra) for k in range(parts + 1)]
    return [range(starts[k], starts[k + 1]) for k in range(parts)]


def layers_prefix(model: nn.Module) -> str:
    """Qualified name of the model's transformer-layer ModuleList (e.g. "model.layers")."""
    layers = get_adapter(model).layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ShardExportError(f"{type(model).__name__}: layer list not found among its modules")


def assign_tensors(names: list[str], prefix: str, n_layers: int, workers: int) -> list[list[str]]:
    """Tensor names per shard, in state-dict order: layer ranges, head/tail with first/last shard."""
    ranges = layer_ranges(n_layers, workers)
    owner = {layer: k for k, r in enumerate(ranges) for layer in r}
    shards: list[list[str]] = [[] for _ in ranges]
    seen_layer = False
    for name in names:
        if name.startswith(prefix + "."):
            layer = int(name[len(prefix) + 1 :].split(".", 1)[0])
            shards[owner[layer]].append(name)
            seen_layer = True
        else:
            shards[-1 if seen_layer else 0].append(name)
    return shards


def write_shard(tensors: dict[str, Tensor], path: str) -> dict:
    """Worker side: write one shard file; returns its name, tensor names and byte size of data."""
    save_file(tensors, path, metadata={"format": "pt"})
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"file": Path(path).name, "tensors": sorted(tensors), "data_bytes": size}


def _uses_ray(executor) -> bool:
    if executor is None:
        return False
    return not isinstance(executor, LocalExecutor)


def _write_shards(
    state: dict[str, Tensor], plan: list[list[str]], staging: Path, executor
) -> list[dict]:
    n = len(plan)
    jobs = [
        ({k: state[k].cpu() for k in names}, str(staging / shard_filename(i, n)))
        for i, names in enumerate(plan)
    ]
    if not _uses_ray(executor):
        return [write_shard(tensors, path) for tensors, path in jobs]
    import ray  # lazy: only a Ray executor's export loads Ray (start-up cost)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # lazy: as above

    if not ray.is_initialized():
        raise ShardExportError(
            "export_sharded: a Ray executor was given but Ray is not initialised"
        )
    # num_cpus=0: a file write must not wait behind the executor's actors holding every CPU.
    # Pinned to the driver's node: the staging directory is on its disk, which other nodes of a
    # multi-node cluster may not mount.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=0, max_retries=2, scheduling_strategy=here)(write_shard)
    return ray.get([task.remote(ray.put(tensors), path) for tensors, path in jobs])


def export_sharded(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    workers: int,
    executor=None,
    *,
    require_uniform: bool = False,
    metadata: dict | None = None,
) -> Path:
    """Write ONE loadable checkpoint at `out_dir` from `workers` layer-range shards (atomic swap)."""
    out = Path(out_dir)
    if workers < 1:
        raise ShardExportError(f"export_sharded: workers must be >= 1, got {workers}")
    if hasattr(model, "peft_config"):
        raise ShardExportError(f"{out}: model carries peft adapters; merge them before exporting")
    config = pruning_config(model, require_uniform, metadata, out)
    state = weights_to_save(model)
    n_layers = len(get_adapter(model).layers(model))
    plan = assign_tensors(list(state), layers_prefix(model), n_layers, workers)
    staging = out.with_name(f".{out.name}.staging-{uuid.uuid4().hex[:8]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        with checkpoint_directory(out) as tmp:
            written = _write_shards(state, plan, staging, executor)
            weight_map = {}
            for info, names in zip(written, plan):
                if info["tensors"] != sorted(names):
                    raise ShardExportError(
                        f"{out}: shard {info['file']} holds other tensors than planned"
                    )
                os.replace(staging / info["file"], tmp / info["file"])
                weight_map.update({name: info["file"] for name in names})
            index = {
                "metadata": {"total_size": sum(i["data_bytes"] for i in written)},
                "weight_map": weight_map,
            }
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
            write_metadata(model, tokenizer, config, tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
