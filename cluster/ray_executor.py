"""RayExecutor: importance estimation spread over Ray actors, a drop-in for LocalExecutor.

The calibration micro-batches are put in the object store once; each worker gets whole
micro-batches round-robin (`shard_batches`) and returns additive sums, which the driver reduces in
worker order, so the result equals the single-process one within float tolerance. Each model
version is shipped once (a shared checkpoint directory, or one `ray.put`), never per task.
A worker that crashes is restarted by Ray (max_restarts); the driver notices it lost its model,
re-sends calibration + the current version and re-runs the (idempotent) task.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from cluster.executor import StaleVersionError, WorkerState, shard_batches
from cluster.ray_session import check_capacity, connect
from cluster.workers import ImportanceWorker, WorkerNotLoadedError
from stages.estimate import EstimateRequest, Stats, reduce_statistics


class RayExecutorError(RuntimeError):
    """A Ray worker failed in a way the executor cannot repair (the message names the worker)."""


class BarrierTimeoutError(RayExecutorError):
    """Not every worker reported the requested model version before the barrier's timeout."""


def start_ray(cluster_cfg) -> bool:
    """Connect as cluster_cfg says; False if Ray was already running in this process.

    The importance actors stay alive (idle) while a Ray Train group of the same size recovers:
    an embedded Ray advertises room for both, or ray_train recovery could never start.
    """
    wanted = cluster_cfg.workers * cluster_cfg.cpus_per_worker
    return connect(cluster_cfg.address, cpus=2 * wanted, dashboard=bool(cluster_cfg.dashboard))


def _cause(exc: BaseException) -> BaseException:
    """The worker-side exception inside a RayTaskError (or the exception itself)."""
    return getattr(exc, "cause", None) or exc


def _cpu_copy(model):
    """The model to ray.put: as is when on CPU, else a CPU copy (workers pick their own device)."""
    param = next(model.parameters(), None)
    if param is None or param.device.type == "cpu":
        return model
    return copy.deepcopy(model).to("cpu")


@dataclass
class _Slot:
    """Driver-side bookkeeping for one actor: its handle and setup calls not yet confirmed."""

    name: str
    actor: object
    pending: list = field(default_factory=list)  # (what, ObjectRef)


class RayExecutor:
    """Same methods as LocalExecutor; one ImportanceWorker actor per `cluster_cfg.workers`.

    `adapter` travels to the workers with each model version; None lets every worker pick it
    with `get_adapter(model)` (one executor can then serve models of several families).
    """

    def __init__(
        self,
        cluster_cfg,
        adapter,
        *,
        barrier_timeout_s: float = 600.0,
        max_recoveries: int = 3,
    ):
        self.workers = int(cluster_cfg.workers)
        self.barrier_timeout_s = barrier_timeout_s
        self.max_recoveries = max_recoveries
        self._adapter = adapter
        self._owns_ray = start_ray(cluster_cfg)
        embedded = not (cluster_cfg.address or os.environ.get("RAY_ADDRESS"))
        check_capacity(
            self.workers,
            cluster_cfg.cpus_per_worker,
            cluster_cfg.gpus_per_worker,
            embedded=embedded,
        )
        self._version: int | None = None
        self._load_args: tuple | None = None
        self._calibration_ref = None
        self._shards: list[list[int]] = [[] for _ in range(self.workers)]
        options = {"num_cpus": cluster_cfg.cpus_per_worker, "num_gpus": cluster_cfg.gpus_per_worker}
        threads = max(1, int(cluster_cfg.cpus_per_worker))
        use_gpu = cluster_cfg.gpus_per_worker > 0
        self._slots = []
        for i in range(self.workers):
            name = f"worker-{i}"
            actor = ImportanceWorker.options(**options).remote(name, threads, use_gpu)
            self._slots.append(_Slot(name, actor))
        self._closed = False

    @property
    def actors(self) -> list:
        """Actor handles in worker order (tests use them for hooks such as pid / delays)."""
        return [slot.actor for slot in self._slots]

    # ------------------------------------------------------------------ protocol
    def set_calibration(self, batches: list[dict]) -> None:
        batches = list(batches)
        self._calibration_ref = ray.put(batches)
        self._shards = shard_batches(list(range(len(batches))), self.workers)
        for slot in self._slots:
            slot.pending.append(
                ("set_calibration", slot.actor.set_calibration.remote(self._calibration_ref))
            )

    def load_version(self, version: int, model, checkpoint_dir: str | None = None) -> None:
        """Start loading `version` on every worker (returns at once; `barrier` waits)."""
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        model_ref = None if checkpoint_dir is not None else ray.put(_cpu_copy(model))
        self._version = version
        self._load_args = (version, checkpoint_dir, model_ref, self._adapter, attn)
        for slot in self._slots:
            slot.pending.append(("load", slot.actor.load.remote(*self._load_args)))

    def barrier(self, version: int) -> list[WorkerState]:
        """Wait until every worker reports `version` (re-loading restarted ones), or time out."""
        if self._version != version:
            raise StaleVersionError(
                f"barrier for version {version}, but the driver loaded version {self._version}"
            )
        deadline = time.monotonic() + self.barrier_timeout_s
        for _ in range(self.max_recoveries + 1):
            self._settle(deadline)
            reported = self._ask_versions(deadline, version)
            lagging = [i for i, v in enumerate(reported) if v != version]
            if not lagging:
                return [WorkerState(slot.name, version) for slot in self._slots]
            for i in lagging:
                self._restore(i)
        names = ", ".join(self._slots[i].name for i in lagging)
        raise RayExecutorError(f"barrier for version {version}: {names} kept losing the model")

    def progress_units(self) -> int:
        return self.workers

    def estimate(self, request: EstimateRequest, version: int, on_progress=None) -> Stats:
        if self._calibration_ref is None:
            raise RayExecutorError(
                "estimate before set_calibration: the workers have no calibration data"
            )
        self._settle(time.monotonic() + self.barrier_timeout_s)
        results: dict[int, Stats] = {}
        todo = list(range(self.workers))
        for attempt in range(self.max_recoveries + 1):
            refs = {
                i: self._slots[i].actor.estimate.remote(request, version, self._shards[i])
                for i in todo
            }
            todo = []
            for i, ref in refs.items():  # ray.get in worker order: each arrival ticks the bar
                if not self._collect(i, ref, results):
                    todo.append(i)
                elif on_progress is not None:
                    on_progress(len(results))
            if not todo:
                return reduce_statistics([results[i] for i in range(self.workers)])
            if attempt < self.max_recoveries:
                for i in todo:
                    self._restore(i)
                self._settle(time.monotonic() + self.barrier_timeout_s)
        names = ", ".join(self._slots[i].name for i in todo)
        raise RayExecutorError(
            f"estimate on version {version}: {names} failed {self.max_recoveries + 1} times"
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # already dead, or Ray shut down: nothing left to release
                pass
        self._slots = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _collect(self, i: int, ref, results: dict[int, Stats]) -> bool:
        """True when worker i's stats arrived; False when it lost its model or died (re-run)."""
        try:
            results[i] = ray.get(ref)
            return True
        except RayActorError:
            return False
        except RayTaskError as exc:
            cause = _cause(exc)
            if isinstance(cause, WorkerNotLoadedError) and self._version is not None:
                return False
            if isinstance(cause, StaleVersionError):
                raise StaleVersionError(str(cause)) from None
            raise RayExecutorError(f"{self._slots[i].name}: estimate failed: {cause!r}") from exc

    def _restore(self, i: int) -> None:
        """Re-send calibration and the current version to a worker that lost them (restart)."""
        slot = self._slots[i]
        if self._calibration_ref is not None:
            slot.pending.append(
                ("set_calibration", slot.actor.set_calibration.remote(self._calibration_ref))
            )
        if self._load_args is not None:
            slot.pending.append(("load", slot.actor.load.remote(*self._load_args)))

    def _settle(self, deadline: float) -> None:
        """Wait for outstanding setup calls; surface their errors; restore crashed workers."""
        for _ in range(self.max_recoveries + 1):
            crashed = [
                i for i, slot in enumerate(self._slots) if not self._settle_slot(slot, deadline)
            ]
            if not crashed:
                return
            for i in crashed:
                self._restore(i)
        names = ", ".join(self._slots[i].name for i in crashed)
        raise RayExecutorError(
            f"{names} crashed {self.max_recoveries + 1} times while loading (restarts exhausted?)"
        )

    def _settle_slot(self, slot: _Slot, deadline: float) -> bool:
        """False if the actor died; its unfinished calls are dropped (`_restore` re-issues them)."""
        while slot.pending:
            what, ref = slot.pending[0]
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except GetTimeoutError:
                raise BarrierTimeoutError(
                    f"{slot.name}: {what} did not finish within {self.barrier_timeout_s:g} s "
                    "(still starting or loading, or waiting for cluster resources)"
                ) from None
            except RayActorError:
                slot.pending = []
                return False
            except (RayTaskError, RayError) as exc:  # e.g. unschedulable: no node has the GPUs
                slot.pending.pop(0)
                raise RayExecutorError(f"{slot.name}: {what} failed: {_cause(exc)!r}") from exc
            slot.pending.pop(0)
        return True

    def _ask_versions(self, deadline: float, version: int) -> list[int | None]:
        refs = [slot.actor.version.remote() for slot in self._slots]
        ready, _ = ray.wait(
            refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic())
        )
        ready_set = set(ready)
        silent = [slot.name for slot, ref in zip(self._slots, refs) if ref not in ready_set]
        if silent:
            raise BarrierTimeoutError(
                f"barrier for version {version} timed out after {self.barrier_timeout_s:g} s: "
                f"{', '.join(silent)} did not report (still loading, or pending resources)"
            )
        reported: list[int | None] = []
        for ref in refs:
            try:
                reported.append(ray.get(ref))
            except RayActorError:
                reported.append(None)  # died after answering the wait: treat as lost
        return reported
