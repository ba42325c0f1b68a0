"""The Ray-free half of distributed recovery: how rows are sharded, and the DeepSpeed stepper.

The training loop itself is stages.training.run_steps, the same one in-process recovery runs;
cluster/train.py wires it into Ray Train with a DDP-wrapped TorchStepper or a DeepSpeedStepper.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from stages.training import TorchStepper, plain_state

STRATEGIES = ("ddp", "deepspeed_zero2", "deepspeed_zero3")
METHODS = ("lora", "full")
MERGED_FILE, PROGRESS_FILE = "merged.safetensors", "progress.json"


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


# ---- DeepSpeed (imported only when asked) --------------------------------------------------------
def require_deepspeed():
    try:
        import deepspeed  # lazy: optional dependency, JIT-compiles ops on first use
    except ImportError as err:
        raise DistributedRecoveryError(
            f"strategy deepspeed_* needs DeepSpeed, which is not installed ({err}); "
            "install it with `pip install .[deepspeed]` or use strategy: ddp"
        ) from None
    return deepspeed


class DeepSpeedStepper:
    """ZeRO-2/3 engine around the torch AdamW (no DeepSpeed optimizer block: it needs compiled ops)."""

    def __init__(self, model, trainable, settings, stage: int, batch_size: int):
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

    def final_state(self, rank: int, lora: bool) -> dict[str, Tensor] | None:
        module, gather = self.model.module, self._deepspeed.zero.GatheredParameters
        with gather(list(module.parameters()), modifier_rank=None, enabled=self.stage == 3):
            return plain_state(module, lora) if rank == 0 else None
