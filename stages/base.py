"""PrunePlan: what a stage removes and why, as replayable data (JSON + refit tensors)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from stages.atomic import dumps_finite
from stages.compensation import Refit

Granularity = Literal["layers", "heads", "channels"]


@dataclass
class PrunePlan:
    """Plan before you cut: a stage decides this from scores, then `apply_plan` performs it.

    Layer indices refer to the model version the plan was made on (`version_in`).
    For heads/channels, `keep[l]` lists kept unit indices of layer l (every layer present).
    A compensated cut (stages/compensation.py) also carries `refit`, the refitted output
    projections of the layers that lost units (tensors: saved as refit.safetensors beside
    plan.json), and `compensation`, what was fitted and the calibration output error per layer.
    """

    REFIT_FILE: ClassVar[str] = "refit.safetensors"
    refit: ClassVar[Refit | None] = None  # set per plan (an attribute, not a JSON field)

    stage: str
    granularity: Granularity
    criterion: str
    version_in: int
    params_before: int
    params_to_remove: int
    drop_layers: list[int] = field(default_factory=list)
    keep: dict[int, list[int]] = field(default_factory=dict)
    scores: list = field(default_factory=list)
    compensation: dict = field(default_factory=dict)
    note: str = ""

    def removed_units(self) -> int:
        if self.granularity == "layers":
            return len(self.drop_layers)
        return sum(len(s) - len(self.keep[layer]) for layer, s in enumerate(self.scores))

    def to_dict(self) -> dict:
        """The JSON part (the refit tensors are not in it)."""
        return asdict(self)

    def to_json(self) -> str:
        return dumps_finite(self.to_dict(), "plan", indent=1)  # a NaN score becomes null

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        raw = json.loads(text)
        raw["keep"] = {int(k): v for k, v in raw.get("keep", {}).items()}
        return cls(**raw)

    def save(self, path: str | Path) -> None:
        """plan.json at `path`, and its refit tensors beside it (REFIT_FILE) when it has any."""
        path = Path(path)
        path.write_text(self.to_json())
        if self.refit is not None:
            self.refit.save(path.with_name(self.REFIT_FILE))

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        path = Path(path)
        plan = cls.from_json(path.read_text())
        if plan.compensation and path.with_name(cls.REFIT_FILE).is_file():
            plan.refit = Refit.load(path.with_name(cls.REFIT_FILE))
        return plan


def param_count(model: torch.nn.Module) -> int:
    """Parameters of `model`, shared ones once (a meta-device skeleton counts like real weights).

    The one whole-model counter: budgets, plans, reports and benchmarks all count with it.
    """
    return sum(p.numel() for p in model.parameters())


def apply_plan(model: torch.nn.Module, adapter, plan: PrunePlan) -> None:
    """Cut the model as the plan says (replay works on any copy of the `version_in` model).

    Units first, then the refitted output projections of a compensated plan (on a meta-device
    skeleton only the shapes matter: biases the refit adds are created, no values copied).
    """
    if plan.granularity == "layers":
        if plan.drop_layers:
            adapter.remove_layers(model, plan.drop_layers)
        return
    for layer_idx in sorted(plan.keep):
        keep = plan.keep[layer_idx]
        if len(keep) == adapter.units(model, layer_idx, plan.granularity):
            continue
        if plan.granularity == "heads":
            adapter.prune_attention(model, layer_idx, keep)
        else:
            adapter.prune_mlp(model, layer_idx, keep)
    if plan.compensation.get("adds_bias"):
        adapter.ensure_out_proj_bias(model, plan.granularity)
    if plan.refit is not None:
        for layer_idx, tensors in plan.refit.items():
            set_out_projection(model, adapter, layer_idx, plan.granularity, tensors)


def set_out_projection(model, adapter, layer_idx: int, granularity: str, tensors: dict) -> None:
    """Give layer i's output projection refitted "weight" [out, in] / "bias" [out] values."""
    module = adapter.out_proj(adapter.layers(model)[layer_idx], granularity)
    if "bias" in tensors and getattr(module, "bias", None) is None:
        adapter.ensure_out_proj_bias(model, granularity)
    with torch.no_grad():
        for name, value in tensors.items():
            target = adapter.out_proj_weight(module) if name == "weight" else module.bias
            if target.shape != value.shape:
                raise ValueError(
                    f"layer {layer_idx} {granularity} refit {name}: shape {tuple(value.shape)} "
                    f"does not fit the projection's {tuple(target.shape)}"
                )
            if target.device.type != "meta":
                target.copy_(value.to(dtype=target.dtype, device=target.device))


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
