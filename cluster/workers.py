"""Ray actors that hold ONE model version and compute calibration statistics on a data shard.

`WorkerCore` is the plain-Python logic (testable without Ray); `ImportanceWorker` is the same
class as a restartable Ray actor. A worker refuses to estimate on any version other than the one
it holds, so a late or restarted worker can never mix two model versions into one result. Tasks
are idempotent (same model, same micro-batches -> same sums), which makes the executor's re-runs
after a crash safe, on the same worker or another one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
import torch

from cluster.executor import StaleVersionError
from stages.arch import get_adapter
from stages.checkpoint import load_pruned
from stages.estimate import EstimateRequest, Stats, collect_for
from stages.training import flush_denormals


class WorkerNotLoadedError(StaleVersionError):
    """The worker holds no model (fresh, or restarted after a crash): the driver must re-load it."""


class WorkerSetupError(ValueError):
    """A worker was asked to load or estimate without what it needs (named in the message)."""


class CheckpointNotVisibleError(WorkerSetupError):
    """The version's checkpoint directory is not on this worker's node (no shared storage there):
    the driver sends the model through the object store instead."""


def _pick_device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class WorkerCore:
    """State of one importance worker: a model version, its adapter and the calibration batches."""

    def __init__(self, name: str, num_threads: int = 1, use_gpu: bool = False):
        self.name = name
        torch.set_num_threads(max(1, int(num_threads)))
        self._device = _pick_device(use_gpu)
        # GPU workers run in bf16 (statistics are accumulated in float64 either way).
        self._dtype = torch.bfloat16 if self._device.type == "cuda" else None
        self._model = None
        self._adapter = None
        self._version: int | None = None
        self._batches: list[dict] | None = None
        self._load_delay_s = 0.0
        self._estimate_delay_s = 0.0

    # ------------------------------------------------------------------ introspection
    def pid(self) -> int:
        return os.getpid()

    def version(self) -> int | None:
        return self._version

    def where(self) -> dict:
        """This worker's process id and Ray node (id and IP; None outside Ray)."""
        node = ip = None
        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
            ip = ray.util.get_node_ip_address()
        return {"pid": os.getpid(), "node": node, "ip": ip}

    def set_test_delays(self, load_s: float = 0.0, estimate_s: float = 0.0) -> None:
        """Test hook: sleep before loading / computing (lost on restart, like all state)."""
        self._load_delay_s = float(load_s)
        self._estimate_delay_s = float(estimate_s)

    # ------------------------------------------------------------------ state changes
    def set_calibration(self, batches: list[dict]) -> None:
        self._batches = list(batches)

    def load(
        self,
        version: int,
        checkpoint_dir: str | None,
        model=None,
        adapter=None,
        attn_implementation: str | None = None,
    ) -> int:
        """Replace the held model: `model` when given, else read from `checkpoint_dir` (storage
        this node shares with the driver)."""
        if self._load_delay_s:
            time.sleep(self._load_delay_s)
        if checkpoint_dir is not None and model is None:
            if not (Path(checkpoint_dir) / "config.json").is_file():
                raise CheckpointNotVisibleError(
                    f"{self.name}: {checkpoint_dir} is not visible on this node (no shared storage)"
                )
            new_model = load_pruned(checkpoint_dir, attn_implementation=attn_implementation)
        elif model is not None:
            new_model = model
        else:
            raise WorkerSetupError(
                f"{self.name}: load(version={version}) got neither checkpoint_dir nor model"
            )
        self._model = None  # drop the old version before moving the new one
        new_model = (
            new_model.to(self._device, dtype=self._dtype)
            if self._dtype
            else new_model.to(self._device)
        )
        if adapter is None:
            adapter = get_adapter(new_model)
        self._model, self._adapter, self._version = new_model.eval(), adapter, version
        return version

    # ------------------------------------------------------------------ work
    def estimate(self, request: EstimateRequest, version: int, batch_indices: list[int]) -> Stats:
        """Additive statistics of this worker's micro-batches (float64 CPU tensors)."""
        if self._version is None:
            raise WorkerNotLoadedError(
                f"{self.name} holds no model version (restarted?), asked for {version}"
            )
        if self._version != version:
            raise StaleVersionError(
                f"{self.name} holds version {self._version}, asked for version {version}"
            )
        if self._batches is None:
            raise WorkerSetupError(
                f"{self.name}: no calibration batches (set_calibration was not called)"
            )
        if self._estimate_delay_s:
            time.sleep(self._estimate_delay_s)
        batches = [self._batches[i] for i in batch_indices]
        with flush_denormals():  # as the driver does (runner.pipeline): same sums, faster on CPU
            stats = collect_for(self._model, self._adapter, batches, request)
        return {key: value.detach().cpu() for key, value in stats.items()}


# No automatic task retries: a call that dies with its worker fails at once, so the driver knows
# which task was lost and re-runs it on a live worker; Ray restarts the actor on its own.
ImportanceWorker = ray.remote(max_restarts=3, max_task_retries=0)(WorkerCore)
