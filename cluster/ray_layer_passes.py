"""Layer passes on Ray: every actor streams the same layer on its rows (`RayExecutor.layer_passes`).

Why: on the streamed path the expensive part is running each layer over the calibration rows;
the rows split cleanly over workers because each micro-batch's hidden states only ever meet that
micro-batch. Each actor is a `stages.streaming.worker.LayerStreamWorker` holding whole micro-batches
(round-robin, with their global indices); the driver loops (`cluster.layer_passes.stream_pass`,
`compensate`) ask all of them for the same layer, add the returned per-micro-batch sums in global
batch order, and get bit-for-bit the sums of one worker, so 1 worker, N workers and the
in-process path make the same plan. Every actor reads the source checkpoint itself from a path
all of them can see (a local disk for an embedded Ray, shared storage on a cluster); no weights
travel through Ray.

A worker lost mid-pass takes its rows' carried hidden states with it, so there is no transparent
retry: the session raises `RayStreamError` naming the worker, and the run is restarted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.layer_passes import shard_rows
from stages.base import PrunePlan
from stages.estimate import EstimateRequest
from stages.streaming.worker import LayerStreamWorker, Part, Stats, StreamSpec

StreamActor = ray.remote(max_restarts=0)(LayerStreamWorker)


class RayStreamError(RuntimeError):
    """A streamed Ray worker died or timed out (the message names it); restart the run."""


class RayLayerPasses:
    """`cluster.layer_passes.LayerPasses` over `workers` LayerStreamWorker actors (Ray running)."""

    def __init__(
        self,
        spec: StreamSpec,
        batches: Sequence[dict],
        workers: int,
        *,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        timeout_s: float = 3600.0,
    ):
        if workers < 1:
            raise ValueError(f"RayLayerPasses: workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.timeout_s = timeout_s
        if spec.torch_threads is None:
            spec = dataclasses.replace(spec, torch_threads=max(1, int(cpus_per_worker)))
        if gpus_per_worker > 0 and torch.device(spec.device).type == "cpu":
            spec = dataclasses.replace(spec, device="cuda")
        options = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
        self._actors = [
            StreamActor.options(**options).remote(spec, shard, running_sum=self.workers == 1)
            for shard in shard_rows(list(batches), self.workers)
        ]

    @property
    def actors(self) -> list:
        return list(self._actors)

    def _get(self, refs: list, what: str) -> list:
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            raise (cause if isinstance(cause, Exception) else err) from None
        except RayActorError as err:
            raise RayStreamError(
                f"streamed {what}: a Ray worker died ({type(err).__name__}); its rows' hidden "
                "states are lost, restart the run"
            ) from None
        except GetTimeoutError:
            raise RayStreamError(
                f"streamed {what}: no answer from the workers within {self.timeout_s:.0f} s"
            ) from None

    def begin_pass(self, plans: Sequence[PrunePlan], activations: bool) -> int:
        plans = list(plans)
        counts = self._get(
            [a.begin_pass.remote(plans, activations) for a in self._actors], "begin_pass"
        )
        if len(set(counts)) != 1:
            raise RayStreamError(f"streamed begin_pass: workers disagree on the layers ({counts})")
        return counts[0]

    def layer_statistics(self, i: int, request: EstimateRequest) -> list[Part]:
        answers = self._get([a.step.remote(i, request) for a in self._actors], f"layer {i}")
        return [part for parts in answers for part in parts]

    def layer_scores(self, request: EstimateRequest, totals: Stats) -> torch.Tensor:
        return self._get([self._actors[0].scores.remote(request, totals)], "scores")[0]

    def advance(self) -> None:
        self._get([a.advance.remote() for a in self._actors], "advance")

    def begin_compensation(self, plans: Sequence[PrunePlan], plan: PrunePlan, settings) -> int:
        refs = [a.begin_compensation.remote(list(plans), plan, settings) for a in self._actors]
        counts = self._get(refs, "begin_compensation")
        if len(set(counts)) != 1:
            raise RayStreamError(
                f"streamed compensation: workers disagree on the layers ({counts})"
            )
        return counts[0]

    def compensation_step(self, i: int) -> list[Part]:
        answers = self._get(
            [a.compensation_step.remote(i) for a in self._actors], f"compensation layer {i}"
        )
        return [part for parts in answers for part in parts]

    def compensation_fit(self, totals: Stats):
        return self._get([self._actors[0].compensation_fit.remote(totals)], "compensation fit")[0]

    def compensation_advance(self, tensors) -> None:
        refs = [a.compensation_advance.remote(tensors) for a in self._actors]
        self._get(refs, "compensation advance")

    def close(self) -> None:
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead, or Ray shut down: nothing left to release
                pass
        self._actors = []
