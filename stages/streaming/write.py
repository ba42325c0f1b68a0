"""Write the pruned checkpoint of a streamed run: one layer in memory at a time.

Why: the output must be the same directory `stages.checkpoint.save_checkpoint` writes (config.json
with the "pruning" layout section, safetensors shards + index, tokenizer files, manifest.json
last, atomic), but the pruned model may not fit in memory either. The final layout is known from
the plans on the meta skeleton, so every shard header is planned up front; each layer is then
read from the source, cut as planned and written, and non-layer tensors (embeddings, final norm,
LM or classification head) are copied in row chunks.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import GenerationConfig

from stages.base import PrunePlan
from stages.checkpoint import (
    TOKENIZER_FILES,
    checkpoint_directory,
    pruning_config,
    tied_pairs,
)
from stages.checkpoint import write_metadata as _write_metadata
from stages.streaming.lazy_weights import Entry, ShardWriter
from stages.streaming.worker import LayerSource

EXTRA_FILES = (
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "spiece.model",
)


def _planned_entries(model) -> tuple[list[Entry], dict]:
    """(name, dtype, shape) of every tensor to store, in state_dict order, tied copies left out."""
    state = model.state_dict(keep_vars=True)
    for target, source in tied_pairs(model).items():
        if target in state and source in state and state[target] is state[source]:
            del state[target]
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in state.items()]
    return entries, state


def write_streamed_checkpoint(
    source: LayerSource,
    plans: Sequence[PrunePlan],
    out_dir: str | Path,
    *,
    max_shard_size: int | str = "2GB",
    require_uniform: bool = False,
    metadata: dict | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Cut the source by `plans` and write ONE loadable directory (atomic, manifest last)."""
    out = Path(out_dir)
    model, history = source.current(plans)
    if (source.checkpoint.directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(source.checkpoint.directory))
    config = pruning_config(model, require_uniform, metadata, out)
    entries, state = _planned_entries(model)
    prefix = source.prefix + "."
    start = last = time.monotonic()
    with checkpoint_directory(out) as tmp:
        writer = ShardWriter(tmp, entries, max_shard_size)
        loaded: int | None = None
        meta_layer = None
        layer_state: dict = {}
        try:
            for name, _, _ in entries:
                if name.startswith(prefix):
                    idx_text, _, suffix = name[len(prefix) :].partition(".")
                    i = int(idx_text)
                    if i != loaded:
                        if loaded is not None:
                            source.restore(model, loaded, meta_layer)
                        meta_layer = source.materialise(model, i, history[i], None)
                        loaded = i
                        layer_state = source.adapter.layers(model)[i].state_dict()
                        if time.monotonic() - last >= 30:
                            last = time.monotonic()
                            log(
                                f"streamed write: layer {i + 1}/{len(history)} "
                                f"({last - start:.0f} s)"
                            )
                    writer.write(name, layer_state[suffix])
                elif name in source.checkpoint:
                    writer.write_chunks(name, source.checkpoint.chunks(name))
                elif state[name].device.type == "meta":
                    source.checkpoint.shape(name)  # raises, naming the missing tensor
                else:  # a persistent buffer the source does not store: the model's own value
                    writer.write(name, state[name].detach())
            if loaded is not None:
                source.restore(model, loaded, meta_layer)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        _write_metadata(model, None, config, tmp)
        for filename in (*TOKENIZER_FILES, *EXTRA_FILES):
            path = source.checkpoint.directory / filename
            if path.is_file():
                shutil.copyfile(path, tmp / filename)
    log(f"streamed write: {out} ({len(history)} layers, {time.monotonic() - start:.1f} s)")
    return out
