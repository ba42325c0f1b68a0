"""The Ray-free half of distributed recovery: sharding, the training step, DeepSpeed steppers.

Everything here runs inside one Ray Train worker (or in a test without Ray): `train_shard` is the
loop, `TorchStepper` / `DeepSpeedStepper` the optimiser step, `shard_indices` / `epoch_batches` the
DistributedSampler-style data split. cluster/train.py wires it into Ray Train.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from stages.objective import model_outputs, task_loss
from stages.recover import RecoverySettings, wrap_lora
from stages.training import EncodedSplit, TrainingError, kd_loss, lr_multiplier

STRATEGIES = ("ddp", "deepspeed_zero2", "deepspeed_zero3")
METHODS = ("lora", "full")
MERGED_FILE, PROGRESS_FILE, STATE_FILE = "merged.safetensors", "progress.json", "trainer_state.pt"


class DistributedRecoveryError(ValueError):
    """Distributed recovery cannot run as configured (the message names the setting)."""


# ---- sharding (pure) -----------------------------------------------------------------------------
def shard_indices(rows: int, rank: int, world: int) -> Tensor:
    """Rows of `rank` as DistributedSampler(shuffle=False) picks them: wrap-pad, then stride."""
    if rows < 1 or world < 1 or not 0 <= rank < world:
        raise DistributedRecoveryError(f"shard_indices: bad rows={rows} rank={rank} world={world}")
    total = math.ceil(rows / world) * world
    return (torch.arange(total) % rows)[rank:total:world]


def per_worker_batch_size(batch_size: int, world: int) -> int:
    return max(1, math.ceil(batch_size / world))


def steps_per_epoch(shard_rows: int, batch_size: int) -> int:
    return math.ceil(shard_rows / batch_size)


def epoch_batches(shard: EncodedSplit, rows: Tensor, batch_size: int, seed: int) -> Iterator[dict]:
    """EncodedSplit.batches(shuffle=True, seed) with "index" = each row's index in the full split."""
    order = torch.randperm(len(shard), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(shard), batch_size):
        pick = order[start : start + batch_size]
        batch = next(shard.subset(pick).batches(len(pick)))
        yield batch | {"index": rows[pick]}


# ---- model preparation (mirrors stages/recover.py) -----------------------------------------------
def prepare_trainable(model: nn.Module, adapter, settings: RecoverySettings):
    """(module to train, its trainable parameters); the LoRA init is seeded by settings.seed."""
    if settings.method == "full":
        return model, [p.requires_grad_(True) for p in model.parameters()]
    peft_model = wrap_lora(model, adapter, settings)
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


def merged_state(trained: nn.Module, method: str) -> dict[str, Tensor]:
    """Plain-model state dict (LoRA merged, wrappers gone), cloned so safetensors can store it."""
    model = trained.merge_and_unload() if method == "lora" else trained
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


# ---- the training loop (no Ray) ------------------------------------------------------------------
def batch_loss(model: nn.Module, batch: dict, settings: RecoverySettings, teacher) -> Tensor:
    logits = model_outputs(model, batch)
    if settings.loss == "ce":
        return task_loss(logits, batch)
    with torch.no_grad():
        target = teacher(batch).detach().to(logits.device)
    t, alpha = settings.kd_temperature, settings.kd_alpha
    return kd_loss(logits, target, batch["labels"], temperature=t, alpha=alpha)


class TorchStepper:
    """AdamW + warmup/cosine LambdaLR + grad clipping, as in stages.training.train_steps."""

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter], settings: RecoverySettings):
        ts = settings.train_settings()
        ts.validate()
        self.model, self.trainable, self.clip = model, trainable, ts.grad_clip
        self.optimizer = torch.optim.AdamW(trainable, lr=ts.lr, weight_decay=ts.weight_decay)
        schedule = lambda s: lr_multiplier(s, ts.steps, ts.warmup_fraction, ts.schedule)  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

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

    def final_state(self, rank: int, method: str) -> dict[str, Tensor] | None:
        return merged_state(self._inner(), method) if rank == 0 else None


def train_shard(
    stepper,
    shard: EncodedSplit,
    rows: Tensor,
    settings: RecoverySettings,
    *,
    batch_size: int,
    resume: tuple[int, list[float]] = (0, []),
    teacher: Callable[[dict], Tensor] | None = None,
    average: Callable[[Tensor], float] = float,
    on_epoch: Callable[[int, list[float]], None] | None = None,
) -> list[float]:
    """Train to settings.steps from resume = (step at an epoch boundary, losses so far).

    Epoch e shuffles with seed + e like stages.training's endless batches, so one full shard
    reproduces train_steps exactly. `average` turns a loss into its mean over the workers.
    """
    device = next(stepper.model.parameters()).device
    per_epoch = steps_per_epoch(len(shard), batch_size)
    step, losses = resume[0], list(resume[1])
    if step % per_epoch and step < settings.steps:
        raise DistributedRecoveryError(f"resume step {step} is not an epoch boundary")
    epoch = step // per_epoch
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed + epoch)
        while step < settings.steps:
            for batch in epoch_batches(shard, rows, batch_size, settings.seed + epoch):
                batch = {k: v if k == "index" else v.to(device) for k, v in batch.items()}
                loss = batch_loss(stepper.model, batch, settings, teacher)
                value = average(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(f"recover_distributed: loss is {value} at step {step}")
                stepper.step(loss)
                losses.append(value)
                step += 1
                if step == settings.steps:
                    break
            epoch += 1
            if on_epoch is not None and step < settings.steps:
                on_epoch(step, losses)
    return losses


# ---- DeepSpeed (imported only when asked) --------------------------------------------------------
def require_deepspeed():
    try:
        import deepspeed
    except ImportError as err:
        raise DistributedRecoveryError(
            f"strategy deepspeed_* needs DeepSpeed, which is not installed ({err}); "
            "install it with `pip install .[deepspeed]` or use strategy: ddp"
        ) from None
    return deepspeed


class DeepSpeedStepper:
    """ZeRO-2/3 engine around the torch AdamW (no DeepSpeed optimizer block: it needs compiled ops)."""

    def __init__(self, model, trainable, settings: RecoverySettings, stage: int, batch_size: int):
        self._deepspeed, self.stage = require_deepspeed(), stage
        base = TorchStepper(model, trainable, settings)
        config = {"train_micro_batch_size_per_gpu": batch_size, "gradient_clipping": base.clip,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}  # fmt: skip
        self.model = self._deepspeed.initialize(
            model=model, optimizer=base.optimizer, lr_scheduler=base.scheduler, config=config
        )[0]

    def step(self, loss: Tensor) -> None:
        self.model.backward(loss)
        self.model.step()  # clips, steps the optimiser and the schedule, zeroes gradients

    def save(self, directory: Path, rank: int) -> bool:
        self.model.save_checkpoint(str(directory), tag="state")  # collective: every rank writes
        return True

    def load(self, directory: Path) -> None:
        self.model.load_checkpoint(str(directory), tag="state")

    def final_state(self, rank: int, method: str) -> dict[str, Tensor] | None:
        module, gather = self.model.module, self._deepspeed.zero.GatheredParameters
        with gather(list(module.parameters()), modifier_rank=None, enabled=self.stage == 3):
            return merged_state(module, method) if rank == 0 else None
