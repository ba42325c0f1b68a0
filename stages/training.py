"""The one training loop: recovery (in-process and under Ray Train), demo training, fine-tuning.

`run_steps` is the loop. It reads shuffled batches of a split (or of one worker's shard of it)
epoch by epoch, asks a `loss_fn` for the loss and hands it to a `Stepper` (plain torch here;
DDP-wrapped or DeepSpeed under Ray Train, cluster/). `train_steps` is the in-process entry. Because
a Ray Train worker runs the very same `run_steps` on its shard, one worker reproduces the
in-process weights exactly.

Epoch e shuffles with seed + e and dropout draws from a CPU RNG seeded with seed + e (forked, so
the caller's RNG is untouched), which makes a run resumable at any epoch boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from stages.objectives import Objective, Teacher, model_device
from stages.precision import autocast_dtype
from stages.split import EncodedSplit

LossFn = Callable[[nn.Module, dict], Tensor]
STATE_FILE = "trainer_state.pt"


class TrainingError(ValueError):
    """A training input is unusable (bad settings, empty split, no trainable weights, NaN loss)."""


@dataclass
class TrainSettings:
    """Optimiser, schedule and loss of one training run (kd = distillation from a teacher)."""

    steps: int
    lr: float = 3e-4
    batch_size: int = 16
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    loss: Literal["ce", "kd"] = "ce"
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5  # kd loss = alpha*KL(teacher||student)*T^2 + (1-alpha)*CE
    schedule: Literal["cosine", "linear"] = "cosine"
    precision: Literal["fp32", "bf16", "auto"] = "fp32"  # bf16 autocast (stages/precision.py)
    loss_chunk: int = 0  # > 0: tokens per LM-head chunk where the objective can (lm_chunks.py)

    def validate(self) -> None:
        """Raise TrainingError naming the first bad field."""
        checks = [
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 <= self.warmup_fraction <= 1, "warmup_fraction must be in [0, 1]"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)"),
            (self.loss in ("ce", "kd"), f"loss must be 'ce' or 'kd', got {self.loss!r}"),
            (self.kd_temperature > 0, "kd_temperature must be > 0"),
            (0 <= self.kd_alpha <= 1, "kd_alpha must be in [0, 1]"),
            (self.schedule in ("cosine", "linear"), f"unknown schedule {self.schedule!r}"),
            (self.precision in ("fp32", "bf16", "auto"), f"unknown precision {self.precision!r}"),
            (self.loss_chunk >= 0, f"loss_chunk must be >= 0, got {self.loss_chunk}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(f"TrainSettings: {message}")


def lr_multiplier(step: int, total: int, warmup_fraction: float, schedule: str = "cosine") -> float:
    """Linear warmup to 1, then cosine or linear decay to 0 at `total` steps."""
    warmup = int(round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    remaining = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / remaining)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def training_loss(objective: Objective, settings: TrainSettings, teacher: Teacher | None) -> LossFn:
    """The objective's loss (`ce`), or its distillation loss against `teacher` (`kd`)."""
    if settings.loss == "kd" and teacher is None:
        raise TrainingError("training: loss='kd' needs a teacher")

    chunked = getattr(objective, "chunked_loss", None) if settings.loss_chunk else None
    kd = {"temperature": settings.kd_temperature, "alpha": settings.kd_alpha}

    def loss(model: nn.Module, batch: dict) -> Tensor:
        target = None
        if settings.loss == "kd":
            with torch.no_grad():
                target = teacher(batch)
        if chunked is not None:
            value = chunked(model, batch, target, chunk=settings.loss_chunk, **kd)
            if value is not None:
                return value
        outputs = objective.outputs(model, batch)
        if target is None:
            return objective.loss(outputs, batch)
        return objective.kd_loss(outputs, target, batch, **kd)

    return loss


@contextmanager
def autocast(precision: str, device: torch.device):
    """bf16 autocast of the forward and loss when `precision` asks for it (and, for `auto`,
    this machine computes bf16 faster: stages.precision); plain fp32 otherwise."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


# ---- steppers ------------------------------------------------------------------------------------
class Stepper(Protocol):
    """One optimiser step from a loss, and the state a resumed run needs."""

    model: nn.Module

    def step(self, loss: Tensor) -> None: ...

    def save(self, directory: Path, rank: int) -> bool: ...

    def load(self, directory: Path) -> None: ...

    def final_state(self, rank: int, lora: bool) -> dict[str, Tensor] | None: ...


def plain_state(module: nn.Module, lora: bool) -> dict[str, Tensor]:
    """State dict of the plain model (LoRA merged, wrappers gone), cloned so it can be stored."""
    model = module.merge_and_unload() if lora else module
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


class TorchStepper:
    """AdamW + linear warmup / cosine (or linear) decay + gradient clipping."""

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter], settings: TrainSettings):
        settings.validate()
        self.model, self.trainable, self.clip = model, trainable, settings.grad_clip
        self.optimizer = torch.optim.AdamW(
            trainable, lr=settings.lr, weight_decay=settings.weight_decay
        )
        total, warmup, schedule = settings.steps, settings.warmup_fraction, settings.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, total, warmup, schedule)
        )

    def step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
        self.optimizer.step()
        self.scheduler.step()

    def _inner(self) -> nn.Module:
        return getattr(self.model, "module", self.model)  # DDP wraps the trained module

    def save(self, directory: Path, rank: int) -> bool:
        """Rank 0 writes trainable weights + optimiser + schedule; True if it wrote files."""
        if rank != 0:
            return False
        weights = {
            n: p.detach().cpu() for n, p in self._inner().named_parameters() if p.requires_grad
        }
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state | {"weights": weights}, directory / STATE_FILE)
        return True

    def load(self, directory: Path) -> None:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, param in self._inner().named_parameters():
                if param.requires_grad:
                    param.copy_(state["weights"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def final_state(self, rank: int, lora: bool) -> dict[str, Tensor] | None:
        return plain_state(self._inner(), lora) if rank == 0 else None


# ---- the loop ------------------------------------------------------------------------------------
def steps_per_epoch(rows: int, batch_size: int) -> int:
    return math.ceil(rows / batch_size)


def epoch_batches(split: EncodedSplit, rows: Tensor, batch_size: int, seed: int) -> Iterator[dict]:
    """One shuffled pass over `split`; "index" = each row's index in the full split (`rows`)."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(split), batch_size):
        pick = order[start : start + batch_size]
        batch = next(split.subset(pick).batches(len(pick)))
        yield batch | {"index": rows[pick]}


_flush_depth = 0


@contextmanager
def flush_denormals():
    """Denormal floats flushed to zero inside the block (nestable), the setting restored after.

    Measured on SmolLM2-135M on a 2-core CPU: a LoRA step took 29-31 s with denormals (tiny
    gradient products early in training) and 3 s without; scoring zero-shot choices took ~5 s per
    item with them and ~1.2 s without, with the same log-likelihoods. Only values below ~1e-38
    change. Jobs run whole under it (runner.pipeline), importance workers estimate under it.
    """
    global _flush_depth
    if _flush_depth == 0:
        torch.set_flush_denormal(True)
    _flush_depth += 1
    try:
        yield
    finally:
        _flush_depth -= 1
        if _flush_depth == 0:
            torch.set_flush_denormal(False)


def run_steps(
    stepper: Stepper,
    split: EncodedSplit,
    settings: TrainSettings,
    loss_fn: LossFn,
    *,
    rows: Tensor | None = None,
    batch_size: int | None = None,
    resume: tuple[int, list[float]] = (0, []),
    average: Callable[[Tensor], float] = float,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[int, list[float]], None] | None = None,
) -> list[float]:
    """Train to settings.steps from resume = (step at an epoch boundary, losses so far).

    `split` is what this process trains on (a worker's shard), `rows` its rows' indices in the
    full split (teachers look rows up by them). `average` turns a loss into its mean over the
    workers. `on_epoch(step, losses)` runs after every full pass that is not the last.
    """
    rows = torch.arange(len(split)) if rows is None else rows
    batch_size = batch_size or settings.batch_size
    device = model_device(stepper.model)
    per_epoch = steps_per_epoch(len(split), batch_size)
    step, losses = resume[0], list(resume[1])
    if step % per_epoch and step < settings.steps:
        raise TrainingError(f"resume step {step} is not an epoch boundary")
    epoch = step // per_epoch
    with (
        torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []),
        flush_denormals(),
    ):
        torch.manual_seed(settings.seed + epoch)
        while step < settings.steps:
            for batch in epoch_batches(split, rows, batch_size, settings.seed + epoch):
                batch = {k: v if k == "index" else v.to(device) for k, v in batch.items()}
                with autocast(settings.precision, device):
                    loss = loss_fn(stepper.model, batch)
                value = average(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(f"training loss is {value} at step {step}")
                stepper.step(loss)
                losses.append(value)
                if on_step is not None:
                    on_step(step, value)
                step += 1
                if step == settings.steps:
                    break
            epoch += 1
            if on_epoch is not None and step < settings.steps:
                on_epoch(step, losses)
    return losses


def train_steps(
    model: nn.Module,
    split: EncodedSplit,
    settings: TrainSettings,
    loss_fn: LossFn,
    *,
    params: Iterable[nn.Parameter] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `settings.steps` AdamW steps in this process; return the per-step losses.

    Deterministic under `settings.seed`; the model's train/eval mode is restored afterwards.
    """
    settings.validate()
    if len(split) == 0:
        raise TrainingError("train_steps: training split is empty")
    trainable = [p for p in (params if params is not None else model.parameters())]
    trainable = [p for p in trainable if p.requires_grad]
    if not trainable:
        raise TrainingError("train_steps: no trainable parameters (all have requires_grad=False)")
    if settings.steps == 0:
        return []
    stepper = TorchStepper(model, trainable, settings)
    was_training = model.training
    model.train()
    try:
        return run_steps(stepper, split, settings, loss_fn, on_step=on_step)
    finally:
        model.train(was_training)
        stepper.optimizer.zero_grad(set_to_none=True)
