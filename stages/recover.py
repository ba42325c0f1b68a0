"""Short recovery after a prune stage, merged back so the next stage sees plain weights.

lora: peft LoRA on the adapter's linear modules (+ the classifier head trained fully), merged.
full: plain fine-tuning of every weight.
mask: COMP-style mask tuning: one learnable scale per remaining head/channel, folded into the
      out-projection columns afterwards (no new parameters survive).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from stages.masking import unit_masks
from stages.objectives import Objective, Teacher, model_device
from stages.precision import autocast_dtype
from stages.split import EncodedSplit
from stages.training import TrainSettings, train_steps, training_loss


@dataclass(frozen=True)
class RecoverySettings:
    method: str = "lora"
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 16
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    loss: str = "ce"
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5
    precision: str = "fp32"
    loss_chunk: int = 0
    seed: int = 0

    @classmethod
    def from_stage(cls, stage, *, seed: int) -> RecoverySettings:
        """From a recover stage config (any object with these attribute names)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "seed"]
        values = {name: getattr(stage, name) for name in names}
        values["loss"] = "ce" if values["loss"] == "lm" else values["loss"]  # lm = the LM's own CE
        return cls(**values, seed=seed)

    def train_settings(self) -> TrainSettings:
        return TrainSettings(
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed,
            loss=self.loss,
            kd_temperature=self.kd_temperature,
            kd_alpha=self.kd_alpha,
            precision=self.precision,
            loss_chunk=self.loss_chunk,
        )


def recover(
    model,
    adapter,
    split: EncodedSplit,
    settings: RecoverySettings,
    objective: Objective,
    teacher: Teacher | None = None,
    on_step=None,
):
    """Returns (model, metrics). The returned model holds merged weights and no LoRA modules.

    teacher: the objective's teacher lookup for `split`'s rows (kd only).
    """
    if settings.loss == "kd" and teacher is None:
        raise ValueError("kd recovery needs a teacher")
    loss_fn = training_loss(objective, settings.train_settings(), teacher)
    start = time.perf_counter()
    losses: list[float] = []
    if settings.steps == 0:
        return model, {"losses": [], "seconds": 0.0, "trainable_params": 0}
    if settings.method == "lora":
        model, losses, trainable = _lora(model, adapter, split, settings, loss_fn, on_step)
    elif settings.method == "full":
        trainable = sum(p.numel() for p in model.parameters())
        losses = _train(model, split, settings, loss_fn, list(model.parameters()), on_step)
    elif settings.method == "mask":
        losses, trainable = _mask_tuning(model, adapter, split, settings, loss_fn, on_step)
    else:
        raise ValueError(f"unknown recovery method {settings.method!r}")
    model.eval()
    dtype = autocast_dtype(settings.precision, model_device(model))
    return model, {
        "precision": "bf16" if dtype is not None else "fp32",
        "losses": losses,
        "seconds": time.perf_counter() - start,
        "trainable_params": trainable,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def _train(model, split, settings, loss_fn, params, on_step=None):
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        return train_steps(
            model, split, settings.train_settings(), loss_fn, params=params, on_step=on_step
        )
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def lora_config(adapter, settings: RecoverySettings):
    """The LoRA setup every recovery path uses (in-process and Ray Train)."""
    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=adapter.lora_target_modules(),
        modules_to_save=adapter.classifier_module_names(),
        fan_in_fan_out=adapter.conv1d_weights,
    )


def wrap_lora(model, adapter, settings: RecoverySettings):
    """peft-wrap with a LoRA init seeded by the stage, not the global RNG (so resume == rerun)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return get_peft_model(model, lora_config(adapter, settings))


def prepare_trainable(model: nn.Module, adapter, settings: RecoverySettings):
    """(module to train, its trainable parameters); the LoRA init is seeded by settings.seed."""
    if settings.method == "full":
        return model, [p.requires_grad_(True) for p in model.parameters()]
    peft_model = wrap_lora(model, adapter, settings)
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


def _lora(model, adapter, split, settings, loss_fn, on_step):
    peft_model, trainable = prepare_trainable(model, adapter, settings)
    peft_model.train()
    losses = train_steps(
        peft_model, split, settings.train_settings(), loss_fn, params=trainable, on_step=on_step
    )
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged, losses, sum(p.numel() for p in trainable)


def _mask_tuning(model, adapter, split, settings, loss_fn, on_step=None):
    n_layers = len(adapter.layers(model))
    device = next(model.parameters()).device
    attn = {
        i: torch.ones(adapter.attn_units(model, i), device=device, requires_grad=True)
        for i in range(n_layers)
    }
    mlp = {
        i: torch.ones(adapter.mlp_units(model, i), device=device, requires_grad=True)
        for i in range(n_layers)
    }
    params = list(attn.values()) + list(mlp.values())
    with unit_masks(model, adapter, attn=attn, mlp=mlp):
        losses = _train(model, split, settings, loss_fn, params, on_step)
    _fold_masks(model, adapter, attn, mlp)
    return losses, sum(p.numel() for p in params)


def _fold_masks(model, adapter, attn, mlp) -> None:
    """Scale each unit's out-projection input columns by its learned mask (exactly equivalent)."""
    layers = adapter.layers(model)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for granularity, mask in (("heads", attn[i]), ("channels", mlp[i])):
                module = adapter.out_proj(layer, granularity)
                w = adapter.unit_width(model, granularity)
                weight = adapter.out_proj_weight(module)  # [out, in] view
                scale = mask.detach().repeat_interleave(w).to(weight.dtype)
                weight.mul_(scale.unsqueeze(0))
