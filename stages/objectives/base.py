"""The Objective protocol, the registry of objectives by name, and the shared predict loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

from stages.metrics import EvalResult
from stages.split import EncodedSplit

Teacher = Callable[[dict], Tensor]


@dataclass(frozen=True)
class TeacherSpec:
    """What a cached teacher must hold for the distillation losses that will read it.

    top_k: next-token logits kept per position (None: the whole vocabulary); temperatures: the
    KD temperatures the teacher is read at (a truncated teacher stores its tail's mass per
    temperature, so its distribution sums to one at each). Objectives that cache their whole
    output (classification) ignore both.
    """

    top_k: int | None = 128
    temperatures: tuple[float, ...] = (1.0, 2.0)


class Objective(Protocol):
    name: ClassVar[str]

    def outputs(self, model: nn.Module, batch: dict) -> Tensor: ...

    def loss(self, outputs: Tensor, batch: dict) -> Tensor: ...

    def importance_loss(self, model: nn.Module, batch: dict) -> Tensor: ...

    def kd_loss(
        self, outputs: Tensor, teacher: Tensor, batch: dict, *, temperature: float, alpha: float
    ) -> Tensor: ...

    def make_teacher(
        self, model: nn.Module, split: EncodedSplit, spec: TeacherSpec | None = None
    ) -> Teacher: ...

    def evaluate(self, model: nn.Module, split: EncodedSplit) -> EvalResult: ...


_OBJECTIVES: dict[str, Objective] = {}


def register_objective(cls: type) -> type:
    """Class decorator: one shared stateless instance per objective name."""
    _OBJECTIVES[cls.name] = cls()
    return cls


def get_objective(name: str) -> Objective:
    try:
        return _OBJECTIVES[name]
    except KeyError:
        raise ValueError(
            f"unknown objective {name!r}; known: {', '.join(sorted(_OBJECTIVES))}"
        ) from None


def objective_names() -> tuple[str, ...]:
    return tuple(sorted(_OBJECTIVES))


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def predict(
    model: nn.Module, split: EncodedSplit, outputs: Callable, *, batch_size: int = 64
) -> Tensor:
    """`outputs(model, batch)` of every row in order, in float32 on the CPU; mode restored."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    results: list[Tensor] = []
    try:
        with torch.no_grad():
            for batch in split.batches(batch_size):
                batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
                results.append(outputs(model, batch).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(results)


class CachedOutputs:
    """A teacher as its outputs cached once per training row, looked up by the batch's row index.

    Picklable (Ray Train workers receive it), and no second model copy is held.
    """

    def __init__(self, outputs: Tensor):
        self.outputs = outputs.detach().cpu()

    def __call__(self, batch: dict) -> Tensor:
        return self.outputs[batch["index"].cpu()]

    def __len__(self) -> int:
        return int(self.outputs.shape[0])
