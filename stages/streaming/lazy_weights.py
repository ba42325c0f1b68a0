"""Weights read lazily from a safetensors checkpoint, and a checkpoint written tensor by tensor.

Why: a model that does not fit in memory can still be pruned one decoder layer at a time, if
nothing ever needs all of its weights at once. `LazyCheckpoint` knows every tensor's file, dtype
and shape from the safetensors headers and reads one tensor (or a few rows) on demand through a
memory map that is closed again straight away, so the mapped pages leave the process's resident
set as soon as the copy is made. `ShardWriter` writes the output shards tensor by tensor in a
fixed order (each shard's header is computed up front from the planned shapes), so writing a
pruned checkpoint never holds more than one tensor either. `meta_skeleton` builds the model on
the meta device with every parameter in the dtype it is stored in.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from stages.checkpoint import CheckpointError, build_on_meta, saved_layouts

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CHUNK_BYTES = 64 * 1024**2  # large tensors (embeddings, LM heads) are copied in row chunks

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class LazyWeightsError(ValueError):
    """A source checkpoint cannot be read lazily, or an output shard is written out of plan."""


class LazyCheckpoint:
    """Tensor names -> (file, dtype, shape) of a Hugging Face safetensors directory; reads on demand.

    Only safetensors are read (never pickles). Each read opens the file, copies the tensor out of
    the memory map (casting if asked) and closes it, so no mapping outlives the call.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise LazyWeightsError(
                f"{self.directory}: no config.json; point at a Hugging Face checkpoint directory"
            )
        self.config: PretrainedConfig = AutoConfig.from_pretrained(
            str(self.directory), trust_remote_code=False
        )
        self._file: dict[str, str] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for filename in self._files():
            if not (self.directory / filename).is_file():
                raise LazyWeightsError(
                    f"{self.directory}: shard {filename} is listed in {INDEX} but missing"
                )
            with safe_open(str(self.directory / filename), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    dtype = _DTYPES.get(view.get_dtype())
                    if dtype is None:
                        raise LazyWeightsError(
                            f"{self.directory / filename}: tensor {name} has unsupported dtype "
                            f"{view.get_dtype()}; convert the checkpoint to float/bfloat16"
                        )
                    self._file[name] = filename
                    self._meta[name] = (dtype, tuple(view.get_shape()))

    def _files(self) -> list[str]:
        index = self.directory / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted(set(weight_map.values()))
        if (self.directory / SINGLE).is_file():
            return [SINGLE]
        raise LazyWeightsError(
            f"{self.directory}: no {SINGLE} or {INDEX}; the streamed path reads safetensors only "
            "(re-save the model with save_pretrained(safe_serialization=True))"
        )

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def names(self) -> list[str]:
        return list(self._file)

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[self._check(name)][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._check(name)][1]

    def nbytes(self, name: str) -> int:
        dtype, shape = self._meta[self._check(name)]
        return _numel(shape) * _itemsize(dtype)

    def _check(self, name: str) -> str:
        if name not in self._file:
            raise LazyWeightsError(
                f"{self.directory}: tensor {name} is not in the checkpoint's safetensors files; "
                "was it saved by a different model class or transformers version?"
            )
        return name

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A private copy of one tensor (cast to dtype if given); the mapping is closed again."""
        path = str(self.directory / self._file[self._check(name)])
        with safe_open(path, framework="pt") as handle:
            view = handle.get_tensor(name)  # backed by the memory map until copied
            if dtype is None or dtype == view.dtype:
                return view.clone()
            return view.to(dtype)

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None):
        """Rows `rows` (1-D, sorted unique) of a 2-D tensor, read run by run: [len(rows), ...]."""
        path = str(self.directory / self._file[self._check(name)])
        rows = rows.tolist()
        parts = []
        with safe_open(path, framework="pt") as handle:
            view = handle.get_slice(name)
            start = 0
            while start < len(rows):
                end = start
                while end + 1 < len(rows) and rows[end + 1] == rows[end] + 1:
                    end += 1
                parts.append(view[rows[start] : rows[end] + 1].clone())
                start = end + 1
        out = torch.cat(parts) if parts else torch.empty(0)
        return out if dtype is None else out.to(dtype)

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """The tensor in row chunks of about CHUNK_BYTES each (for a bounded-memory copy)."""
        shape = self.shape(name)
        if len(shape) < 2 or self.nbytes(name) <= CHUNK_BYTES:
            yield self.read(name)
            return
        rows_per_chunk = max(1, CHUNK_BYTES // (self.nbytes(name) // shape[0]))
        path = str(self.directory / self._file[name])
        for start in range(0, shape[0], rows_per_chunk):
            with safe_open(path, framework="pt") as handle:
                chunk = handle.get_slice(name)[start : start + rows_per_chunk].clone()
            yield chunk


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- the model skeleton ------------------------------------------------------------------------
def meta_skeleton(
    source: LazyCheckpoint, attn_implementation: str | None = None
) -> PreTrainedModel:
    """The source's model class built on the meta device, each parameter in its stored dtype.

    Buffers (rotary inverse frequencies) are real CPU tensors computed by the model's own
    __init__, exactly as for a model loaded in memory. Parameters the checkpoint does not store
    (tied LM heads) keep the dtype of the tensor they are tied to.
    """

    try:
        layouts = saved_layouts(source.config)  # a pruned checkpoint streams too
        model = build_on_meta(
            source.config, layouts=layouts, attn_implementation=attn_implementation
        )
    except CheckpointError as err:
        raise LazyWeightsError(str(err)) from None
    wrong = sorted(
        (name, list(source.shape(name)), list(param.shape))
        for name, param in model.named_parameters(remove_duplicate=False)
        if name in source and tuple(param.shape) != source.shape(name)
    )
    if wrong:  # config.json and the weights disagree (e.g. an edited num_key_value_heads)
        name, stored, expected = wrong[0]
        more = f" (and {len(wrong) - 1} more tensor(s))" if len(wrong) > 1 else ""
        raise LazyWeightsError(
            f"{source.directory}: the weights do not match config.json: {name} has shape "
            f"{stored} in the checkpoint but config.json makes it {expected}{more}; restore the "
            "checkpoint's own config.json"
        )
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in source and param.dtype != source.dtype(name):
            param.data = torch.empty(param.shape, dtype=source.dtype(name), device="meta")
    model.tie_weights()
    return model.eval()


def module_name(root: nn.Module, target: nn.Module) -> str:
    """Qualified name of `target` inside `root` (e.g. "model.layers")."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise LazyWeightsError(f"module {type(target).__name__} is not part of {type(root).__name__}")


# ---- writing shards tensor by tensor -------------------------------------------------------------
Entry = tuple[str, torch.dtype, tuple[int, ...]]


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


class ShardWriter:
    """Writes planned tensors, in plan order, into safetensors shards (+ index when sharded).

    Shards are filled greedily in plan order (a new shard when the next tensor would push the
    current one past max_shard_size); each shard's header is written when its first tensor comes,
    then the tensor bytes follow one by one, so memory never holds more than the tensor at hand.
    """

    def __init__(self, directory: Path, entries: Sequence[Entry], max_shard_size: int | str):
        self.directory = Path(directory)
        self.entries = list(entries)
        limit = _parse_size(max_shard_size)
        groups: list[list[int]] = [[]]
        size = 0
        for i, (_, dtype, shape) in enumerate(self.entries):
            nbytes = _numel(shape) * _itemsize(dtype)
            if groups[-1] and size + nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nbytes
        n = len(groups)
        self.filenames = (
            [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        self._shard_of = {i: k for k, group in enumerate(groups) for i in group}
        self._groups = groups
        self._next = 0
        self._handle = None
        self._open_shard = -1
        self._remaining = 0  # bytes still expected for the tensor being written

    def _header(self, shard: int) -> bytes:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in self._groups[shard]:
            name, dtype, shape = self.entries[i]
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {
                "dtype": _NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_chunks(name, [tensor])

    def write_chunks(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write the next planned tensor from consecutive row chunks (or one whole tensor)."""
        if self._next >= len(self.entries):
            raise LazyWeightsError(f"{self.directory}: tensor {name} written beyond the plan")
        want_name, dtype, shape = self.entries[self._next]
        if name != want_name:
            raise LazyWeightsError(f"{self.directory}: expected tensor {want_name}, got {name}")
        shard = self._shard_of[self._next]
        if shard != self._open_shard:
            self._close_handle()
            self._handle = open(self.directory / self.filenames[shard], "wb")
            self._handle.write(self._header(shard))
            self._open_shard = shard
        expected = _numel(shape) * _itemsize(dtype)
        written = 0
        rows = 0
        for chunk in chunks:
            if chunk.dtype != dtype or tuple(chunk.shape[1:]) != tuple(shape[1:]):
                raise LazyWeightsError(
                    f"{self.directory}: tensor {name} is {chunk.dtype} {tuple(chunk.shape)}, "
                    f"planned {dtype} {tuple(shape)}"
                )
            flat = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            self._handle.write(memoryview(flat.numpy()))
            written += flat.numel()
            rows += chunk.shape[0] if chunk.dim() else 1
        if written != expected:
            raise LazyWeightsError(
                f"{self.directory}: tensor {name} has {written} bytes, planned {expected}"
            )
        self._next += 1

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        """Finish the last shard and write the index (sharded output only)."""
        self._close_handle()
        if self._next != len(self.entries):
            missing = self.entries[self._next][0]
            raise LazyWeightsError(f"{self.directory}: tensor {missing} was never written")
        if len(self.filenames) > 1:
            total = sum(_numel(s) * _itemsize(d) for _, d, s in self.entries)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {
                    name: self.filenames[self._shard_of[i]]
                    for i, (name, _, _) in enumerate(self.entries)
                },
            }
            (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))

    def abort(self) -> None:
        self._close_handle()
