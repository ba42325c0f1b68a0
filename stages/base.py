"""PrunePlan: what a stage removes and why, as replayable data (JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from stages.atomic import dumps_finite

Granularity = Literal["layers", "heads", "channels"]


@dataclass
class PrunePlan:
    """Plan before you cut: a stage decides this from scores, then `apply_plan` performs it.

    Layer indices refer to the model version the plan was made on (`version_in`).
    For heads/channels, `keep[l]` lists kept unit indices of layer l (every layer present).
    """

    stage: str
    granularity: Granularity
    criterion: str
    version_in: int
    params_before: int
    params_to_remove: int
    drop_layers: list[int] = field(default_factory=list)
    keep: dict[int, list[int]] = field(default_factory=dict)
    scores: list = field(default_factory=list)
    bias_deltas: dict[int, list[float]] = field(default_factory=dict)
    note: str = ""

    def removed_units(self) -> int:
        if self.granularity == "layers":
            return len(self.drop_layers)
        return sum(len(s) - len(self.keep[layer]) for layer, s in enumerate(self.scores))

    def to_json(self) -> str:
        return dumps_finite(asdict(self), "plan", indent=1)  # a NaN score becomes null

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        raw = json.loads(text)
        raw["keep"] = {int(k): v for k, v in raw.get("keep", {}).items()}
        raw["bias_deltas"] = {int(k): v for k, v in raw.get("bias_deltas", {}).items()}
        return cls(**raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        return cls.from_json(Path(path).read_text())


def apply_plan(model: torch.nn.Module, adapter, plan: PrunePlan) -> None:
    """Cut the model as the plan says (replay works on any copy of the `version_in` model)."""
    if plan.granularity == "layers":
        if plan.drop_layers:
            adapter.remove_layers(model, plan.drop_layers)
        return
    layers = adapter.layers(model)
    for layer_idx, deltas in plan.bias_deltas.items():
        _add_out_proj_bias(adapter, model, layers[layer_idx], plan.granularity, deltas)
    for layer_idx in sorted(plan.keep):
        keep = plan.keep[layer_idx]
        if len(keep) == adapter.units(model, layer_idx, plan.granularity):
            continue
        if plan.granularity == "heads":
            adapter.prune_attention(model, layer_idx, keep)
        else:
            adapter.prune_mlp(model, layer_idx, keep)


def _add_out_proj_bias(adapter, model, layer, granularity: str, deltas: list[float]) -> None:
    """FLAP bias compensation: fold the removed columns' mean contribution into the bias."""
    module = adapter.out_proj(layer, granularity)
    if getattr(module, "bias", None) is None:
        adapter.ensure_out_proj_bias(model, granularity)
    bias = module.bias
    with torch.no_grad():
        bias.add_(torch.tensor(deltas, dtype=bias.dtype, device=bias.device))


def stage_names(stages) -> list[str]:
    """A stage list's names: explicit ones, else the kind, numbered when a kind repeats
    (recover1, recover2, ...). One rule for jobs and streamed runs (stage directories, events)."""
    counts: dict[str, int] = {}
    for s in stages:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for s in stages:
        seen[s.kind] = seen.get(s.kind, 0) + 1
        names.append(s.name or (s.kind if counts[s.kind] == 1 else f"{s.kind}{seen[s.kind]}"))
    return names
