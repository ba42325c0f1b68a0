"""Physical slicing of projection modules (nn.Linear and GPT-2's transposed Conv1D).

A projection's features along one side (its outputs or its inputs) are grouped into prunable
units of `width` consecutive features; fused projections (GPT-2 c_attn = q|k|v) repeat that unit
layout once per segment. Everything here works on the meta device too, so loading can resize
modules before any weight exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

OUT = "out"  # rows of the [out, in] weight, and the bias
IN = "in"  # columns of the [out, in] weight; the bias belongs to the outputs and stays

TensorGetter = Callable[[nn.Parameter], Tensor | None]


class UnsupportedModule(ValueError):
    """A module that must be sliced is neither nn.Linear nor Conv1D (e.g. an unmerged LoRA layer)."""


@dataclass(frozen=True)
class UnitProjection:
    """Where the features of one prunable unit live inside one projection module."""

    module: nn.Module
    side: str  # OUT or IN
    width: int  # features per unit within one segment
    segments: int = 1  # fused projections: the unit layout repeats once per segment


def check_projection(module: nn.Module) -> nn.Module:
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise UnsupportedModule(
            f"cannot slice {type(module).__name__}: only nn.Linear and Conv1D are supported "
            "(merge LoRA adapters with merge_and_unload() before pruning)"
        )
    return module


def out_in_weight(module: nn.Module) -> Tensor:
    """The weight as [out_features, in_features]; a view, so in-place edits reach the module."""
    check_projection(module)
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def feature_rows(tensor: Tensor, module: nn.Module, side: str) -> Tensor:
    """View of a weight-shaped tensor (the weight or its grad) with one row per feature of `side`."""
    out_in = tensor.T if isinstance(module, Conv1D) else tensor
    return out_in if side == OUT else out_in.T


def base_layer(module: nn.Module) -> nn.Module:
    """The plain projection under a peft LoRA wrapper (or the module itself)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def num_features(module: nn.Module, side: str) -> int:
    """Feature count along `side`; reads through LoRA wrappers so layouts work on peft models."""
    module = check_projection(base_layer(module))
    if isinstance(module, Conv1D):
        return module.nf if side == OUT else module.nx
    return module.out_features if side == OUT else module.in_features


def unit_feature_index(keep: Tensor, units: int, width: int, segments: int = 1) -> Tensor:
    """Feature indices of the kept units, segment by segment (pure function of integers)."""
    per_unit = (keep.unsqueeze(1) * width + torch.arange(width, device=keep.device)).reshape(-1)
    offsets = torch.arange(segments, device=keep.device) * units * width
    return (offsets.unsqueeze(1) + per_unit.unsqueeze(0)).reshape(-1)


def _replace(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


def _set_feature_count(module: nn.Module, side: str, count: int) -> None:
    if isinstance(module, Conv1D):
        if side == OUT:
            module.nf = count
        else:
            module.nx = count
    elif side == OUT:
        module.out_features = count
    else:
        module.in_features = count


def select_features(module: nn.Module, side: str, index: Tensor) -> None:
    """Keep only the features `index` along `side` (new contiguous parameters, same dtype/device)."""
    check_projection(module)
    weight = module.weight
    index = index.to(weight.device)
    # Linear weight is [out, in]; Conv1D weight is [in, out].
    dim = (0 if side == OUT else 1) if not isinstance(module, Conv1D) else (1 if side == OUT else 0)
    with torch.no_grad():
        _replace(module, "weight", weight.index_select(dim, index).contiguous())
        if side == OUT and module.bias is not None:
            _replace(module, "bias", module.bias.index_select(0, index).contiguous())
    _set_feature_count(module, side, int(index.numel()))


def resize_features(module: nn.Module, side: str, count: int) -> None:
    """Give `side` exactly `count` features with UNINITIALISED parameters (for loading weights)."""
    check_projection(module)
    weight = module.weight
    shape = list(weight.shape)
    dim = (0 if side == OUT else 1) if not isinstance(module, Conv1D) else (1 if side == OUT else 0)
    shape[dim] = count
    _replace(module, "weight", torch.empty(shape, dtype=weight.dtype, device=weight.device))
    if side == OUT and module.bias is not None:
        bias = module.bias
        _replace(module, "bias", torch.empty(count, dtype=bias.dtype, device=bias.device))
    _set_feature_count(module, side, count)


def unit_rows(proj: UnitProjection, units: int, get: TensorGetter) -> list[Tensor]:
    """Per-unit rows [units, k] of the projection's weight (and bias on the OUT side).

    `get` maps a parameter to the tensor to read (the parameter itself, or its .grad), so weights
    and gradients are reshaped identically. Row u holds every parameter removed with unit u.
    """
    module = check_projection(proj.module)
    tensors = [("weight", module.weight)]
    if proj.side == OUT and module.bias is not None:
        tensors.append(("bias", module.bias))
    rows = []
    for name, param in tensors:
        value = get(param)
        if value is None:
            raise ValueError(f"{type(module).__name__}.{name} has no value to read (no .grad yet?)")
        if name == "weight":
            value = feature_rows(value, module, proj.side)
        value = value.reshape(proj.segments, units, -1).transpose(0, 1).reshape(units, -1)
        rows.append(value)
    return rows


def validate_keep(keep: Sequence[int] | Tensor, units: int, where: str) -> Tensor:
    """Sorted, checked unit indices: non-empty, unique, each in [0, units)."""
    values = [int(k) for k in (keep.tolist() if isinstance(keep, Tensor) else keep)]
    if not values:
        raise ValueError(f"{where}: keep is empty; at least one of {units} units must stay")
    if len(set(values)) != len(values):
        raise ValueError(f"{where}: keep has duplicate indices {sorted(values)}")
    bad = [k for k in values if not 0 <= k < units]
    if bad:
        raise ValueError(f"{where}: keep indices {bad} out of range [0, {units})")
    return torch.tensor(sorted(values), dtype=torch.long)
