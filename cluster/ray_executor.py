"""RayExecutor: importance estimation spread over Ray actors, a drop-in for LocalExecutor.

The calibration micro-batches are put in the object store once; they are cut into one shard per
worker (`shard_batches`), each worker returns additive sums of its shard, and the driver reduces
them in SHARD order, so the result equals the single-process one within float tolerance whatever
worker ran which shard. Each model version is shipped once (a checkpoint directory the workers can
read, or one `ray.put`), never per task. The actors are spread over the cluster's nodes.

Losing a worker (its process killed, its node gone) shows as a failed call. The driver records it
(`worker_lost`: worker, node, pid, task, version, seconds the task had run), gives the lost shard
to a live worker holding the same version (`task_rerun`: where, how long) and carries on, so a
stage finishes, with the same statistics bit for bit, while at least one worker lives. Ray restarts
the actor wherever there is room (`max_restarts`); when it answers again the driver re-sends
calibration and the current version and takes it back (`worker_restart`: its new node and pid,
seconds away). Every such event goes to `on_event` (the job's events.jsonl) and, as one line, to
`warnings` (the report's).

Layer passes (`layer_passes`) run on a second group of actors of the same size and resources,
LayerStreamWorkers (`cluster.ray_layer_passes`), started for the session and killed when it
closes. The importance actors start with the first importance call (`set_calibration`,
`load_version`), so an executor that only serves layer passes (a streamed run) never holds
resources, GPUs included, that its layer workers need.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ray
from ray.exceptions import (
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RayError,
    RayTaskError,
)

from cluster.executor import StaleVersionError, WorkerState, shard_batches
from cluster.ray_layer_passes import RayLayerPasses
from cluster.ray_session import check_capacity, connect
from cluster.workers import CheckpointNotVisibleError, ImportanceWorker, WorkerNotLoadedError
from stages.estimate import EstimateRequest, Stats, reduce_statistics
from stages.streaming.worker import StreamSpec

EventSink = Callable[..., object]  # sink(event, version=..., **fields), e.g. EventLog.emit


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


def _short(node: str | None) -> str:
    return node[:8] if node else "?"


def _first_line(exc: BaseException) -> str:
    """The exception's type and first sentence (Ray's messages run on for lines)."""
    text = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(exc).__name__}: {text}"[:160]


@dataclass
class _Away:
    """A lost worker: when it was lost, doing what, and a call that answers once it is back."""

    since: float
    task: str
    probe: object  # ObjectRef of where() on the (restarting) actor


@dataclass
class _Slot:
    """Driver-side bookkeeping for one actor: its handle, placement and unconfirmed setup calls."""

    name: str
    actor: object
    pending: list = field(default_factory=list)  # (what, ObjectRef)
    pid: int | None = None
    node: str | None = None  # Ray node id (hex)
    ip: str | None = None
    away: _Away | None = None  # lost, not yet back
    returning: _Away | None = None  # back, its restore calls not yet confirmed
    gone: bool = False  # Ray gave up restarting it

    def place(self) -> dict:
        return {"worker": self.name, "node": self.node, "ip": self.ip, "pid": self.pid}


class RayExecutor:
    """Same methods as LocalExecutor; one ImportanceWorker actor per `cluster_cfg.workers`.

    `adapter` travels to the workers with each model version; None lets every worker pick it
    with `get_adapter(model)` (one executor can then serve models of several families).
    `on_event` (settable later) receives worker_start / worker_lost / task_rerun /
    worker_restart / worker_gone events; `warnings` collects one line per loss and return.
    """

    def __init__(
        self,
        cluster_cfg,
        adapter,
        *,
        barrier_timeout_s: float = 600.0,
        max_recoveries: int = 3,
        on_event: EventSink | None = None,
    ):
        self.workers = int(cluster_cfg.workers)
        self.barrier_timeout_s = barrier_timeout_s
        self.max_recoveries = max_recoveries
        self.on_event = on_event
        self.warnings: list[str] = []
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
        self._model = None  # the loaded version's model, for workers that cannot read its files
        self._model_ref = None
        self._calibration_ref = None
        self._shards: list[list[int]] = [[] for _ in range(self.workers)]
        self._cpus, self._gpus = cluster_cfg.cpus_per_worker, cluster_cfg.gpus_per_worker
        self._slots: list[_Slot] = []  # the importance actors, started by `_start_workers`
        self._starting = threading.Lock()
        self._passes: list[RayLayerPasses] = []
        self._closed = False

    def _start_workers(self) -> None:
        """Start the importance actors once, before the first importance call needs them."""
        with self._starting:
            if self._slots or self._closed:
                return
            # SPREAD: one worker per node where possible, so losing a node loses few workers.
            options = {
                "num_cpus": self._cpus,
                "num_gpus": self._gpus,
                "scheduling_strategy": "SPREAD",
            }
            threads, use_gpu = max(1, int(self._cpus)), self._gpus > 0
            for i in range(self.workers):
                name = f"worker-{i}"
                actor = ImportanceWorker.options(**options).remote(name, threads, use_gpu)
                self._slots.append(_Slot(name, actor, [("start", actor.where.remote())]))

    @property
    def actors(self) -> list:
        """Importance actor handles in worker order, started if not yet (tests use them for hooks
        such as pid / delays)."""
        self._start_workers()
        return [slot.actor for slot in self._slots]

    # ------------------------------------------------------------------ protocol
    def set_calibration(self, batches: list[dict]) -> None:
        self._start_workers()
        batches = list(batches)
        self._calibration_ref = ray.put(batches)
        self._shards = shard_batches(list(range(len(batches))), self.workers)
        for slot in self._live_slots():
            slot.pending.append(
                ("set_calibration", slot.actor.set_calibration.remote(self._calibration_ref))
            )

    def load_version(self, version: int, model, checkpoint_dir: str | None = None) -> None:
        """Start loading `version` on every worker (returns at once; `barrier` waits)."""
        self._start_workers()
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        self._model_ref = None if checkpoint_dir is not None else ray.put(_cpu_copy(model))
        self._model = model
        self._version = version
        self._load_args = (version, checkpoint_dir, self._model_ref, self._adapter, attn)
        for slot in self._live_slots():
            slot.pending.append(("load", slot.actor.load.remote(*self._load_args)))

    def barrier(self, version: int) -> list[WorkerState]:
        """Wait until every live worker reports `version`; lost ones rejoin when Ray restarts them.

        Returns the workers that hold `version` (at least one, or it raises).
        """
        if self._version != version:
            raise StaleVersionError(
                f"barrier for version {version}, but the driver loaded version {self._version}"
            )
        deadline = time.monotonic() + self.barrier_timeout_s
        for _ in range(self.max_recoveries + 1):
            self._revive()
            self._settle(deadline)
            live = self._live()
            reported = self._ask_versions(deadline, version, live)
            lagging = [(i, v) for i, v in zip(live, reported) if v != version]
            if not lagging:
                return [WorkerState(self._slots[i].name, version) for i in live]
            for i, held in lagging:
                self._lose(i, f"barrier for version {version}", error=f"holds version {held}")
        raise RayExecutorError(f"barrier for version {version}: workers kept losing the model")

    def progress_units(self) -> int:
        return self.workers

    def estimate(self, request: EstimateRequest, version: int, on_progress=None) -> Stats:
        if self._calibration_ref is None:
            raise RayExecutorError(
                "estimate before set_calibration: the workers have no calibration data"
            )
        deadline = time.monotonic() + self.barrier_timeout_s
        self._revive()
        self._settle(deadline)
        what = f"estimate {request.granularity}/{request.criterion}"
        results: dict[int, Stats] = {}
        tries = dict.fromkeys(range(self.workers), 0)
        lost_from: dict[int, str] = {}  # shard -> worker it was lost with
        running: dict = {}  # ObjectRef -> (shard, slot index, started)
        queue = list(range(self.workers))
        while queue or running:
            for shard in queue:
                tries[shard] += 1
                if tries[shard] > self.max_recoveries + 1:
                    raise RayExecutorError(
                        f"{what} on version {version}: shard {shard} was lost "
                        f"{self.max_recoveries + 1} times (workers: {lost_from[shard]}, ...)"
                    )
                i = self._assign(shard, running, deadline)
                ref = self._slots[i].actor.estimate.remote(request, version, self._shards[shard])
                running[ref] = (shard, i, time.monotonic())
            queue = []
            (ref,), _ = ray.wait(list(running), num_returns=1)
            shard, i, started = running.pop(ref)
            task = f"{what} on shard {shard} (batches {self._shards[shard]})"
            error = self._collect(i, ref, shard, results)
            if error is not None:
                self._lose(i, task, started=started, error=error)
                lost_from.setdefault(shard, self._slots[i].name)
                queue.append(shard)
                continue
            if shard in lost_from:
                self._rerun_done(i, task, lost_from[shard], started)
            if on_progress is not None:
                on_progress(len(results))
        return reduce_statistics([results[k] for k in range(self.workers)])

    def layer_passes(self, spec: StreamSpec, batches: Sequence[dict]) -> RayLayerPasses:
        """One LayerStreamWorker actor per worker, with the importance actors' resources."""
        passes = RayLayerPasses(
            spec, batches, self.workers, cpus_per_worker=self._cpus, gpus_per_worker=self._gpus
        )
        self._passes.append(passes)
        return passes

    def close(self) -> None:
        if self._closed:
            return
        with self._starting:
            self._closed = True
        for passes in self._passes:
            passes.close()
        self._passes = []
        for slot in self._slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # already dead, or Ray shut down: nothing left to release
                pass
        self._slots = []
        self._model = self._model_ref = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ events
    def _emit(self, event: str, warning: str | None = None, **fields) -> None:
        if warning is not None:
            self.warnings.append(warning)
        if self.on_event is not None:
            self.on_event(event, version=self._version, **fields)

    def _lose(self, i: int, task: str, *, started: float | None = None, error: str = "") -> None:
        """Record worker i as lost while doing `task`; ask it to answer once Ray restarted it."""
        slot = self._slots[i]
        if slot.away is not None or slot.gone:
            return
        now = time.monotonic()
        ran = None if started is None else round(now - started, 3)
        slot.pending, slot.returning = [], None
        slot.away = _Away(now, task, slot.actor.where.remote())
        ran_text = "" if ran is None else f" after {ran:.1f} s"
        self._emit(
            "worker_lost",
            warning=f"{slot.name} (node {_short(slot.node)} {slot.ip or '?'}, pid {slot.pid}) "
            f"was lost during {task} on version {self._version}{ran_text}: {error}",
            **slot.place(),
            task=task,
            seconds=ran,
            error=error,
        )

    def _rerun_done(self, i: int, task: str, lost_with: str, started: float) -> None:
        slot, seconds = self._slots[i], round(time.monotonic() - started, 3)
        self._emit(
            "task_rerun",
            warning=f"{task} (lost with {lost_with}) re-ran on {slot.name} (node "
            f"{_short(slot.node)}) in {seconds:.1f} s",
            **slot.place(),
            task=task,
            lost_with=lost_with,
            seconds=seconds,
        )

    # ------------------------------------------------------------------ internals
    def _live(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s.away is None and not s.gone]

    def _live_slots(self) -> list[_Slot]:
        return [self._slots[i] for i in self._live()]

    def _assign(self, shard: int, running: dict, deadline: float) -> int:
        """The shard's own worker if live, else the live worker with the fewest tasks queued."""
        live = self._live() or self._await_live(deadline)
        if shard in live:
            return shard
        load = {i: 0 for i in live}
        for _, i, _ in running.values():
            if i in load:
                load[i] += 1
        return min(live, key=lambda i: (load[i], i))

    def _await_live(self, deadline: float) -> list[int]:
        """Every worker is lost: wait for Ray to restart one (until the deadline)."""
        while True:
            self._revive(wait_s=min(1.0, max(0.0, deadline - time.monotonic())))
            self._settle(deadline, await_live=False)
            if self._live():
                return self._live()
            if all(s.gone for s in self._slots) or time.monotonic() >= deadline:
                raise RayExecutorError(
                    f"every worker was lost and none came back within {self.barrier_timeout_s:g} s "
                    "(nodes gone and no room for restarts?)"
                )

    def _revive(self, wait_s: float = 0.0) -> None:
        """Take back lost workers that answer again: re-send calibration and the current version."""
        away = [(i, s) for i, s in enumerate(self._slots) if s.away is not None]
        if not away:
            return
        ready, _ = ray.wait([s.away.probe for _, s in away], num_returns=len(away), timeout=wait_s)
        ready = set(ready)
        for i, slot in away:
            if slot.away.probe not in ready:
                continue
            try:
                info = ray.get(slot.away.probe)
            except ActorUnavailableError:  # transient (restarting, unreachable): ask again
                slot.away.probe = slot.actor.where.remote()
                continue
            except RayActorError as exc:
                slot.gone, lost = True, slot.away
                slot.away = None
                self._emit(
                    "worker_gone",
                    warning=f"{slot.name} could not be restarted ({_first_line(exc)}); "
                    "the other workers run its shards",
                    **slot.place(),
                    task=lost.task,
                    seconds=round(time.monotonic() - lost.since, 3),
                )
                continue
            slot.pid, slot.node, slot.ip = info["pid"], info["node"], info["ip"]
            slot.returning, slot.away = slot.away, None
            self._restore(i)

    def _restore(self, i: int) -> None:
        """Re-send calibration and the current version to a worker that lost them (restart)."""
        slot = self._slots[i]
        if self._calibration_ref is not None:
            slot.pending.append(
                ("set_calibration", slot.actor.set_calibration.remote(self._calibration_ref))
            )
        if self._load_args is not None:
            slot.pending.append(("load", slot.actor.load.remote(*self._load_args)))

    def _settle(self, deadline: float, await_live: bool = True) -> None:
        """Wait for live workers' outstanding setup calls; the ones that died are marked lost."""
        for i in self._live():
            slot = self._slots[i]
            failed = self._settle_slot(slot, deadline)
            if failed is not None:
                what, error = failed
                self._lose(i, f"{what} (version {self._version})", error=error)
            elif slot.returning is not None:
                back, slot.returning = slot.returning, None
                seconds = round(time.monotonic() - back.since, 3)
                self._emit(
                    "worker_restart",
                    warning=f"{slot.name} is back on node {_short(slot.node)} {slot.ip or '?'} "
                    f"(pid {slot.pid}) with version {self._version}, {seconds:.1f} s after it was "
                    "lost",
                    **slot.place(),
                    task=back.task,
                    seconds=seconds,
                )
        if await_live and not self._live():
            self._await_live(deadline)

    def _settle_slot(self, slot: _Slot, deadline: float) -> tuple[str, str] | None:
        """(what, error) if the actor died; its unfinished calls are dropped (re-sent on return)."""
        while slot.pending:
            what, ref = slot.pending[0]
            try:
                result = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except GetTimeoutError:
                raise BarrierTimeoutError(
                    f"{slot.name}: {what} did not finish within {self.barrier_timeout_s:g} s "
                    "(still starting or loading, or waiting for cluster resources)"
                ) from None
            except RayActorError as exc:
                slot.pending = []
                return what, _first_line(exc)
            except RayTaskError as exc:
                slot.pending.pop(0)
                if what == "load" and isinstance(_cause(exc), CheckpointNotVisibleError):
                    slot.pending.insert(0, ("load", self._load_from_store(slot)))
                    continue
                raise RayExecutorError(f"{slot.name}: {what} failed: {_cause(exc)!r}") from exc
            except RayError as exc:  # e.g. unschedulable: no node has the GPUs
                slot.pending.pop(0)
                raise RayExecutorError(f"{slot.name}: {what} failed: {_cause(exc)!r}") from exc
            slot.pending.pop(0)
            if what == "start":
                slot.pid, slot.node, slot.ip = result["pid"], result["node"], result["ip"]
                self._emit("worker_start", **slot.place())
        return None

    def _load_from_store(self, slot: _Slot):
        """The worker cannot read the version's directory: send the model through Ray instead."""
        if self._model_ref is None:
            self._model_ref = ray.put(_cpu_copy(self._model))
        version, _, _, adapter, attn = self._load_args
        self._load_args = (version, None, self._model_ref, adapter, attn)
        return slot.actor.load.remote(*self._load_args)

    def _collect(self, i: int, ref, shard: int, results: dict[int, Stats]) -> str | None:
        """None when the shard's stats arrived; the error when the worker died or lost its model."""
        try:
            results[shard] = ray.get(ref)
            return None
        except RayActorError as exc:
            return _first_line(exc)
        except RayTaskError as exc:
            cause = _cause(exc)
            if isinstance(cause, WorkerNotLoadedError) and self._version is not None:
                return "restarted without its model"
            if isinstance(cause, StaleVersionError):
                raise StaleVersionError(str(cause)) from None
            raise RayExecutorError(f"{self._slots[i].name}: estimate failed: {cause!r}") from exc

    def _ask_versions(self, deadline: float, version: int, live: list[int]) -> list[int | None]:
        refs = [self._slots[i].actor.version.remote() for i in live]
        ready, _ = ray.wait(
            refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic())
        )
        ready_set = set(ready)
        silent = [self._slots[i].name for i, ref in zip(live, refs) if ref not in ready_set]
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
