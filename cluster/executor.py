"""Where the work runs. LocalExecutor: in-process (tests, GPU box without Ray).

The job talks to an executor only through this small protocol, so the Ray version
(`cluster.ray_executor.RayExecutor`) is a drop-in replacement. It serves two kinds of request:
importance on a model version every worker holds (`load_version`, `barrier`, `estimate`), and
layer passes over a checkpoint, one decoder layer at a time (`layer_passes`: the layer-streamed
path and compensation, `cluster/layer_passes.py`). Calibration data is split into fixed
micro-batches once; a worker gets whole micro-batches, so every per-batch statistic adds up to
the single-process value whatever the number of workers.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from cluster.layer_passes import LayerPasses, LocalLayerPasses
from stages.estimate import EstimateRequest, Stats, collect_for, reduce_statistics
from stages.streaming.worker import StreamSpec

Progress = Callable[[int], None]  # called with the number of units done so far


class ClusterCapacityError(ValueError):
    """The job asks for more workers, CPUs or GPUs than the Ray cluster (or this machine) has."""


class StaleVersionError(RuntimeError):
    """A worker was asked to estimate on a model version it does not hold."""


@dataclass(frozen=True)
class WorkerState:
    worker: str
    version: int


class Executor(Protocol):
    workers: int
    # Worker losses and restarts: each is passed to on_event(event, version=..., **fields) when set
    # (the job's EventLog.emit) and summed up as one line in `warnings` (the report's).
    on_event: Callable[..., object] | None
    warnings: list[str]

    def set_calibration(self, batches: list[dict]) -> None: ...

    def load_version(self, version: int, model, checkpoint_dir: str | None) -> None: ...

    def barrier(self, version: int) -> list[WorkerState]: ...

    def estimate(
        self, request: EstimateRequest, version: int, on_progress: Progress | None = None
    ) -> Stats: ...

    def progress_units(self) -> int:
        """How many on_progress calls one estimate makes (batches here, shards on Ray)."""
        ...

    def layer_passes(self, spec: StreamSpec, batches: Sequence[dict]) -> LayerPasses:
        """Open layer passes over the checkpoint `spec` names, the rows split over the workers
        (the caller closes the session; the executor's `close()` frees any left open)."""
        ...

    def close(self) -> None: ...


def shard_batches(batches: list, workers: int) -> list[list]:
    """Round-robin whole micro-batches over workers (deterministic)."""
    return [batches[i::workers] for i in range(workers)]


def _counted(items: list, on_progress: Progress | None) -> Iterator:
    for done, item in enumerate(items, 1):
        yield item
        if on_progress is not None:
            on_progress(done)


class LocalExecutor:
    """Runs on the driver's own model object: no copies, no serialization.

    Layer passes run in this process with `layer_workers` LayerStreamWorkers (one; more only to
    test the row split without Ray).
    """

    workers = 1

    def __init__(self, adapter, *, layer_workers: int = 1):
        self.on_event = None  # nothing to report: the driver's own process never goes missing
        self.warnings: list[str] = []
        self.layer_workers = layer_workers
        self._adapter = adapter
        self._model = None
        self._version: int | None = None
        self._batches: list[dict] = []

    def set_calibration(self, batches: list[dict]) -> None:
        self._batches = list(batches)

    def load_version(self, version: int, model, checkpoint_dir: str | None = None) -> None:
        self._model = model
        self._version = version

    def barrier(self, version: int) -> list[WorkerState]:
        if self._version != version:
            raise StaleVersionError(
                f"local worker holds version {self._version}, expected {version}"
            )
        return [WorkerState("local", version)]

    def estimate(
        self, request: EstimateRequest, version: int, on_progress: Progress | None = None
    ) -> Stats:
        if self._version != version:
            raise StaleVersionError(
                f"local worker holds version {self._version}, asked for {version}"
            )
        return reduce_statistics(
            [collect_for(self._model, self._adapter, _counted(self._batches, on_progress), request)]
        )

    def progress_units(self) -> int:
        return len(self._batches)

    def layer_passes(self, spec: StreamSpec, batches: Sequence[dict]) -> LayerPasses:
        return LocalLayerPasses(spec, batches, self.layer_workers)

    def close(self) -> None:
        self._model = None


@contextmanager
def cluster_session(cluster_cfg):
    """One Ray runtime for a whole job (not one per model): started here, shut down at the end."""
    if cluster_cfg.executor != "ray":
        yield
        return
    import ray  # lazy: local jobs never load Ray (start-up cost)

    from cluster.ray_executor import start_ray  # lazy: imports Ray

    started = start_ray(cluster_cfg)
    terminated = False
    with _sigterm_unwinds():
        try:
            yield
        except Terminated:
            terminated = True
        finally:
            if started and ray.is_initialized():
                ray.shutdown()
    if terminated:  # shut down cleanly; now end as a SIGTERMed process does (exit 143)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM arrived while a job ran on Ray (BaseException: no `except Exception` swallows it)."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Ray's runtime aborts the driver on SIGTERM with a C++ stack dump (exit 134); a Python
    handler instead unwinds the job (finally blocks, ray.shutdown) and then exits 143 like a
    local job. Only the main thread can set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def make_executor(cluster_cfg, adapter) -> Executor:
    if cluster_cfg.executor == "local":
        return LocalExecutor(adapter)
    from cluster.ray_executor import RayExecutor  # lazy: imports Ray (start-up cost)

    return RayExecutor(cluster_cfg, adapter)
