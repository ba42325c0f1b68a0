"""Reversible, hook-based views of a pruned model: unit masks, skipped layers, layer I/O capture.

Masking a unit's out-projection input columns to zero gives exactly the outputs of slicing that
unit away, so masks serve both as the reference for slicing tests and as differentiable gates
for Taylor scores (d loss / d mask) and mask tuning. Every context manager removes its hooks on
exit, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from stages.arch.base import ArchAdapter


def expand_unit_mask(mask: Tensor, width: int) -> Tensor:
    """Per-unit mask -> per-column mask (each unit owns `width` consecutive columns)."""
    return mask.repeat_interleave(width)


def _column_mask_hook(mask: Tensor, width: int):
    def hook(_module: nn.Module, args: tuple, kwargs: dict):
        columns = expand_unit_mask(mask, width)
        if args:
            x = args[0]
            return (x * columns.to(dtype=x.dtype, device=x.device), *args[1:]), kwargs
        x = kwargs["input"]
        return args, {**kwargs, "input": x * columns.to(dtype=x.dtype, device=x.device)}

    return hook


def _checked_mask(mask: Tensor, units: int, where: str) -> Tensor:
    if mask.dim() != 1 or mask.numel() != units:
        raise ValueError(f"{where}: mask shape {tuple(mask.shape)} != ({units},) units")
    return mask


@contextmanager
def unit_masks(
    model: nn.Module,
    adapter: ArchAdapter,
    attn: dict[int, Tensor] | None = None,
    mlp: dict[int, Tensor] | None = None,
) -> Iterator[None]:
    """Multiply each unit's out-projection input columns by its mask entry (may require grad)."""
    layers = adapter.layers(model)
    handles = []
    try:
        if attn:
            width = adapter.head_dim(model) * adapter.heads_per_unit(model)
            for i, mask in attn.items():
                _checked_mask(mask, adapter.attn_units(model, i), f"unit_masks attn layer {i}")
                module = adapter.attn_out_proj(layers[i])
                handles.append(
                    module.register_forward_pre_hook(
                        _column_mask_hook(mask, width), with_kwargs=True
                    )
                )
        for i, mask in (mlp or {}).items():
            _checked_mask(mask, adapter.mlp_units(model, i), f"unit_masks mlp layer {i}")
            module = adapter.mlp_out_proj(layers[i])
            handles.append(
                module.register_forward_pre_hook(_column_mask_hook(mask, 1), with_kwargs=True)
            )
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hidden_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def skip_layers(
    model: nn.Module, adapter: ArchAdapter, layer_indices: Iterable[int]
) -> Iterator[None]:
    """Each listed layer returns its input hidden state unchanged (and does no work).

    The layer's forward is shadowed by an instance attribute, so module hooks still run. Meant
    for cache-free forwards: a skipped layer writes nothing into a KV cache.
    """
    layers = adapter.layers(model)
    indices = sorted({int(i) for i in layer_indices})
    bad = [i for i in indices if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"skip_layers: indices {bad} out of range [0, {len(layers)})")

    def identity(*args, **kwargs):
        return _hidden_input(args, kwargs)

    shadowed = []
    try:
        for i in indices:
            layers[i].forward = identity
            shadowed.append(layers[i])
        yield
    finally:
        for layer in shadowed:
            del layer.forward


@contextmanager
def capture_layer_io(
    model: nn.Module, adapter: ArchAdapter
) -> Iterator[dict[int, tuple[Tensor, Tensor]]]:
    """Yield {layer_idx: (input_hidden, output_hidden)} filled by each forward (latest call wins).

    Tensors are detached; run the forward inside the `with` block and read them after it.
    """
    captured: dict[int, tuple[Tensor, Tensor]] = {}

    def make_hook(idx: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output):
            out = output[0] if isinstance(output, tuple) else output
            captured[idx] = (_hidden_input(args, kwargs).detach(), out.detach())

        return hook

    handles = [
        layer.register_forward_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(adapter.layers(model))
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
