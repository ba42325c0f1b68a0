"""Layer passes: the executor's second kind of request, and the driver loops that make them.

Why a second kind: importance on a model version (`Executor.estimate`) needs the whole model on
every worker; a layer pass needs one decoder layer at a time. The workers of a pass
(`stages.streaming.worker.LayerStreamWorker`, the maths of one layer) each hold whole calibration
micro-batches and stream the SAME layer of a checkpoint on their own rows; the driver adds their
per-micro-batch sums in global batch order, so 1 worker, N workers and the in-process path give
bit-for-bit the same totals, scores, plans and refits.

Every executor serves them (`Executor.layer_passes(spec, batches)`): `LocalExecutor` with
`LocalLayerPasses` (workers in this process), `RayExecutor` with LayerStreamWorker actors
(`cluster.ray_layer_passes`). The loops over one pass live here, once: `stream_pass` scores every
layer for one request, `compensate` refits the layers a plan cuts. Users: `cluster.stream_prune`
(the layer-streamed cascade) and `cluster.compensate_model` (an in-memory model's refit).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from stages.base import PrunePlan
from stages.compensation import CompensationSettings, Refit
from stages.criteria import get_criterion
from stages.estimate import EstimateRequest
from stages.streaming.worker import LayerStreamWorker, Part, Stats, StreamSpec, reduce_parts

_KEEP_KEYS = ("dist_sum",)  # small per-layer sums kept after scoring
HEARTBEAT_S = 30.0

Log = Callable[[str], None]


class LayerPasses(Protocol):
    """One session of layer passes over one checkpoint: every worker streams the same layer, each
    on its own rows. Opened by `Executor.layer_passes(spec, batches)`; `close()` frees it."""

    workers: int

    def begin_pass(self, plans: Sequence[PrunePlan], activations: bool) -> int: ...

    def layer_statistics(self, i: int, request: EstimateRequest) -> list[Part]: ...

    def layer_scores(self, request: EstimateRequest, totals: Stats) -> torch.Tensor: ...

    def advance(self) -> None: ...

    def begin_compensation(
        self, plans: Sequence[PrunePlan], plan: PrunePlan, settings: CompensationSettings
    ) -> int: ...

    def compensation_step(self, i: int) -> list[Part]: ...

    def compensation_fit(self, totals: Stats): ...

    def compensation_advance(self, tensors) -> None: ...

    def close(self) -> None: ...


def shard_rows(batches: Sequence[dict], workers: int) -> list[list[Part]]:
    """Whole micro-batches, round-robin, each with its global index (the reduction order)."""
    indexed = list(enumerate(batches))
    return [indexed[w::workers] for w in range(workers)]


class LocalLayerPasses:
    """Layer workers in this process (one by default; more only to test the row split, no Ray)."""

    def __init__(self, spec: StreamSpec, batches: Sequence[dict], workers: int = 1):
        if workers < 1:
            raise ValueError(f"LocalLayerPasses: workers must be >= 1, got {workers}")
        self.workers = workers
        self._workers = [
            LayerStreamWorker(spec, shard, running_sum=workers == 1)
            for shard in shard_rows(batches, workers)
        ]

    def begin_pass(self, plans: Sequence[PrunePlan], activations: bool) -> int:
        return [w.begin_pass(plans, activations) for w in self._workers][0]

    def layer_statistics(self, i: int, request: EstimateRequest) -> list[Part]:
        return [part for w in self._workers for part in w.step(i, request)]

    def layer_scores(self, request: EstimateRequest, totals: Stats) -> torch.Tensor:
        return self._workers[0].scores(request, totals)

    def advance(self) -> None:
        for w in self._workers:
            w.advance()

    def begin_compensation(self, plans, plan, settings) -> int:
        return [w.begin_compensation(plans, plan, settings) for w in self._workers][0]

    def compensation_step(self, i: int) -> list[Part]:
        return [part for w in self._workers for part in w.compensation_step(i)]

    def compensation_fit(self, totals: Stats):
        return self._workers[0].compensation_fit(totals)

    def compensation_advance(self, tensors) -> None:
        for w in self._workers:
            w.compensation_advance(tensors)

    def close(self) -> None:
        self._workers = []


class Heartbeat:
    """Logs the current status every HEARTBEAT_S seconds while long work runs without a line."""

    def __init__(self, log: Log, every: float = HEARTBEAT_S):
        self.log, self.every = log, every
        self.status = ""
        self._start = self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def say(self, line: str) -> None:
        self._last = time.monotonic()
        self.log(line)

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.every)):
            if time.monotonic() - self._last >= self.every and self.status:
                self.say(f"{self.status} ({time.monotonic() - self._start:.0f} s)")


# ---- the driver loops of one pass ----------------------------------------------------------------
def stream_pass(
    passes: LayerPasses,
    plans: Sequence[PrunePlan],
    request: EstimateRequest,
    *,
    heartbeat: Heartbeat | None = None,
    keep_sums: bool = False,
) -> tuple[torch.Tensor | list[torch.Tensor], Stats]:
    """Score every layer of the model after `plans` in one streamed pass: (scores, stats).

    Scores have the in-memory shapes (a float32 [layers] tensor for layers, else one float64
    [units] tensor per layer); stats keeps rows, tokens and the layers' block distances (every
    per-layer sum with keep_sums: tests compare them with the in-memory sums).
    """
    activations = bool(get_criterion(request.criterion).statistics)
    n_layers = passes.begin_pass(plans, activations)
    stats: Stats = {}
    scores: list[torch.Tensor] = []
    for i in range(n_layers):
        if heartbeat is not None:
            what = f"{request.granularity} pass ({request.criterion})"
            heartbeat.status = f"streamed {what}: layer {i + 1}/{n_layers}"
        totals = reduce_parts(passes.layer_statistics(i, request))
        scores.append(passes.layer_scores(request, totals))
        passes.advance()
        for key, value in totals.items():
            if "." not in key:
                stats.setdefault(key, value)
            elif keep_sums or key.split(".", 1)[1] in _KEEP_KEYS:
                stats[key] = value
    if request.granularity == "layers":
        return torch.stack(scores), stats
    return scores, stats


def compensate(
    passes: LayerPasses,
    plans: Sequence[PrunePlan],
    plan: PrunePlan,
    settings: CompensationSettings,
    *,
    adds_bias: bool,
    heartbeat: Heartbeat | None = None,
) -> None:
    """Refit the layers `plan` cuts (made on the model after `plans`), one streamed pass.

    Per layer: every worker's per-micro-batch sums, reduced in global batch order, one fit
    (stages/compensation.py) on the first worker, the refit sent to all. Sets plan.refit and
    plan.compensation (method, inputs, ridge, and each refit layer's calibration output error
    before and after, relative to the layer's output power).
    """
    n_layers = passes.begin_compensation(plans, plan, settings)
    tensors, errors = {}, {}
    for i in range(n_layers):
        if heartbeat is not None:
            heartbeat.status = f"compensation ({settings.method}): layer {i + 1}/{n_layers}"
        totals = reduce_parts(passes.compensation_step(i))
        fitted = passes.compensation_fit(totals) if totals else None
        if fitted is not None:
            tensors[i], errors[str(i)] = fitted
        passes.compensation_advance(tensors.get(i))
    plan.refit = Refit(tensors)
    plan.compensation = {
        "method": settings.method,
        "inputs": settings.inputs,
        "ridge": settings.ridge,
        "adds_bias": adds_bias,
        "layers": errors,
    }
