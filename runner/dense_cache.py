"""Measure a dense model once per comparison, not once per method and ratio.

`cascade compare` runs every method at every ratio as its own job, and every job starts by
measuring the dense model (`Task.measure`: test perplexity, per-domain perplexity, choice
accuracy, greedy completions for a causal LM). With the same model and data that measurement is
the same every time, and on SmolLM2 it costs one to two minutes per job on 2 cores: 20 of them
in a 7-method x 3-ratio comparison. Inside `reuse_dense_measures()` a measurement is kept in
memory and handed out again (a deep copy) to a job whose model weights, data and settings hash
to the same key. Outside it every job measures, so a single run pays nothing for hashing.

The key covers what `measure` reads: the task, the model entry and evaluation settings, every
weight (after any task-head fine-tune) and every token, label and item of the data, so a changed
source file or a different fine-tune is measured afresh.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

_active: list[dict[str, dict]] = []  # the innermost reuse_dense_measures() cache, if any


@contextmanager
def reuse_dense_measures() -> Iterator[None]:
    """Within this block, jobs in this process share dense measurements with equal keys."""
    _active.append({})
    try:
        yield
    finally:
        _active.pop()


def measure_dense(
    measure: Callable[[], dict], *, model: nn.Module, data, settings: tuple
) -> tuple[dict, bool]:
    """(measures, reused): `measure()`'s result, or an earlier one with the same key."""
    if not _active:
        return measure(), False
    cache = _active[-1]
    key = fingerprint(model, data, settings)
    if key not in cache:
        cache[key] = measure()
        return copy.deepcopy(cache[key]), False
    return copy.deepcopy(cache[key]), True


def fingerprint(model: nn.Module, data, settings: tuple) -> str:
    """A hash of the model's weights, the data (splits and extras) and `settings` (strings)."""
    h = hashlib.blake2b(digest_size=20)
    _feed(h, settings)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _feed(h, tensor)
    # "recovery" is the seeded subset of "train" that recover stages reach: its size follows the
    # method's step budget, and no measurement reads it ("train" itself is hashed).
    _feed(h, {name: split for name, split in data.splits.items() if name != "recovery"})
    _feed(h, data.extras)
    return h.hexdigest()


def _feed(h, obj) -> None:
    """Hash tensors by dtype, shape and bytes; containers and dataclasses by their contents.
    Other objects (a tokenizer) add only their type: what they hold follows from the model entry
    in `settings`."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().reshape(-1)
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(type(obj).__name__.encode())
        _feed(h, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    elif obj is None or isinstance(obj, (str, int, float, bool)):
        h.update(repr(obj).encode())
    else:
        h.update(type(obj).__qualname__.encode())
