"""Layer-streamed structured pruning: prune a model that does not fit in memory.

Why: the in-memory path holds the whole model (and, for Taylor, its activations for backward).
Layer-local criteria only need, per layer, that layer's weights and the statistics of its
out-projection inputs (or its input/output hidden states), so the model can be streamed: the
skeleton lives on the meta device, ONE decoder layer is materialised at a time from the source's
safetensors, and the calibration rows' hidden states are carried from layer to layer
(`stages.stream_worker`). Global selection needs every layer's scores before cutting, so each
stage is one streamed pass over the model as it is after the stages before it; the plans come
from the same planning step as the in-memory path (`stages.stage_plan.plan_stage`) and the
scores are bit-for-bit the in-memory ones. A final pass writes the pruned checkpoint
(`stages.stream_write`). See docs/STREAMING.md.

Entry point: `stream_prune`. `stream_scores` scores one request (used by tests and benchmarks).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from stages.arch import model_types_where
from stages.base import PrunePlan, apply_plan, param_count, stage_names
from stages.compensation import CompensationSettings, Refit
from stages.criteria import get_criterion
from stages.estimate import EstimateRequest
from stages.prune_stage import PruneStage, streaming_problems
from stages.stage_plan import PlanLimits, plan_stage
from stages.stream_worker import (
    LayerSource,
    LayerStreamWorker,
    Part,
    Stats,
    StreamSpec,
    reduce_parts,
)
from stages.stream_write import write_streamed_checkpoint

_KEEP_KEYS = ("dist_sum",)  # small per-layer sums kept after scoring
HEARTBEAT_S = 30.0

Log = Callable[[str], None]


class StreamingError(ValueError):
    """A streamed pruning request that cannot run (the message says why and what to use instead)."""


# ---- executors -----------------------------------------------------------------------------------
class StreamExecutor(Protocol):
    """Where the layer workers run; all workers stream the same layer, each on its own rows."""

    workers: int

    def start(self, spec: StreamSpec, batches: Sequence[dict]) -> None: ...

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


class LocalStreamExecutor:
    """Workers in this process (one by default; more only to test the row split without Ray)."""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise StreamingError(f"LocalStreamExecutor: workers must be >= 1, got {workers}")
        self.workers = workers
        self._workers: list[LayerStreamWorker] = []

    def start(self, spec: StreamSpec, batches: Sequence[dict]) -> None:
        self._workers = [
            LayerStreamWorker(spec, shard, running_sum=self.workers == 1)
            for shard in shard_rows(batches, self.workers)
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


# ---- one streamed pass ---------------------------------------------------------------------------
def stream_pass(
    executor: StreamExecutor,
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
    n_layers = executor.begin_pass(plans, activations)
    stats: Stats = {}
    scores: list[torch.Tensor] = []
    for i in range(n_layers):
        if heartbeat is not None:
            what = f"{request.granularity} pass ({request.criterion})"
            heartbeat.status = f"streamed {what}: layer {i + 1}/{n_layers}"
        totals = reduce_parts(executor.layer_statistics(i, request))
        scores.append(executor.layer_scores(request, totals))
        executor.advance()
        for key, value in totals.items():
            if "." not in key:
                stats.setdefault(key, value)
            elif keep_sums or key.split(".", 1)[1] in _KEEP_KEYS:
                stats[key] = value
    if request.granularity == "layers":
        return torch.stack(scores), stats
    return scores, stats


def compensate(
    executor: StreamExecutor,
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
    n_layers = executor.begin_compensation(plans, plan, settings)
    tensors, errors = {}, {}
    for i in range(n_layers):
        if heartbeat is not None:
            heartbeat.status = f"compensation ({settings.method}): layer {i + 1}/{n_layers}"
        totals = reduce_parts(executor.compensation_step(i))
        fitted = executor.compensation_fit(totals) if totals else None
        if fitted is not None:
            tensors[i], errors[str(i)] = fitted
        executor.compensation_advance(tensors.get(i))
    plan.refit = Refit(tensors)
    plan.compensation = {
        "method": settings.method,
        "inputs": settings.inputs,
        "ridge": settings.ridge,
        "adds_bias": adds_bias,
        "layers": errors,
    }


def _spill(plan: PrunePlan, work_dir: Path | None, idx: int) -> None:
    """Keep a compensated plan's refit on disk instead of in memory (a model larger than it)."""
    if work_dir is not None and plan.refit is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        plan.refit.spill(work_dir / f"stage{idx:02d}.{PrunePlan.REFIT_FILE}")


def adds_out_proj_bias(model, adapter, stage: PruneStage) -> bool:
    """Does this stage's compensation give the output projections a bias they do not have?"""
    module = adapter.out_proj(adapter.layers(model)[0], stage.kind)
    return stage.compensate == "bias" and getattr(module, "bias", None) is None


def _spec(source_dir, device, compute_dtype, attn_implementation, torch_threads) -> StreamSpec:
    return StreamSpec(
        source_dir=str(source_dir),
        device=str(device),
        compute_dtype=compute_dtype,
        attn_implementation=attn_implementation,
        torch_threads=torch_threads,
    )


def _check_batches(batches: Sequence[dict]) -> list[dict]:
    batches = list(batches)
    if not batches:
        raise StreamingError("calibration_batches is empty; pass at least one micro-batch")
    for n, batch in enumerate(batches):
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        if ids is None or mask is None or ids.dim() != 2 or ids.shape != mask.shape:
            raise StreamingError(
                f"calibration batch {n}: needs 2-D input_ids and attention_mask of one shape "
                "(rows x tokens), as the in-memory calibration batches have"
            )
    return batches


def stream_scores(
    source_dir: str | Path,
    calibration_batches: Sequence[dict],
    request: EstimateRequest,
    *,
    plans: Sequence[PrunePlan] = (),
    executor: StreamExecutor | None = None,
    device: str = "cpu",
    compute_dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    torch_threads: int | None = None,
    keep_sums: bool = False,
):
    """Scores of one request on the source cut by `plans`, streamed: (scores, stats)."""
    _check_stages([PruneStage(kind=request.granularity, criterion=request.criterion, count=1)])
    executor = executor or LocalStreamExecutor()
    spec = _spec(source_dir, device, compute_dtype, attn_implementation, torch_threads)
    executor.start(spec, _check_batches(calibration_batches))
    try:
        return stream_pass(executor, plans, request, keep_sums=keep_sums)
    finally:
        executor.close()


# ---- plans ---------------------------------------------------------------------------------------
def _check_stages(stages: Sequence[PruneStage], params_target: int | None = None) -> None:
    """Refuse, in one line, what the layer-streamed path cannot run (stages.prune_stage rules)."""
    if not stages:
        raise StreamingError("stages is empty; give at least one PruneStage")
    names = stage_names(stages)
    problems = [text for _, text in streaming_problems(stages, names)]
    for name, stage in zip(names, stages):
        if stage.share is not None and params_target is None:
            problems.append(f"stream stage {name}: share needs params_target (the job's target)")
    if problems:
        raise StreamingError(
            "; ".join(problems) + " (or use the in-memory path on a machine that holds the model:"
            " docs/STREAMING.md)"
        )


def _check_source(source: LayerSource, stages: Sequence[PruneStage]) -> None:
    if not source.adapter.streamable:
        streamable = model_types_where(lambda adapter, _: adapter.streamable)
        raise StreamingError(
            f"{source.checkpoint.directory}: model_type {source.dense.config.model_type!r} is not "
            f"supported by the layer-streamed path (decoders: {', '.join(streamable)}); "
            "use the in-memory path"
        )
    for name, stage in zip(stage_names(stages), stages):
        if stage.compensate == "bias":
            try:
                source.adapter.ensure_out_proj_bias(copy.deepcopy(source.dense), stage.kind)
            except ValueError as err:
                raise StreamingError(f"stream stage {name}: {err}") from None


def stream_prune(
    source_dir: str | Path,
    out_dir: str | Path,
    stages: Sequence[PruneStage],
    calibration_batches: Sequence[dict],
    *,
    seed: int = 0,
    limits: PlanLimits | None = None,
    executor: StreamExecutor | None = None,
    device: str = "cpu",
    compute_dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    torch_threads: int | None = None,
    max_shard_size: int | str = "2GB",
    require_uniform: bool = False,
    metadata: dict | None = None,
    work_dir: str | Path | None = None,
    log: Log = print,
) -> list[PrunePlan]:
    """Prune the checkpoint at source_dir stage by stage, streamed; write out_dir; the plans.

    Stages run in order without recovery between them; plan i has version_in = i. `seed` seeds
    torch for parity with the job (the streamed path itself draws no random numbers).
    """
    torch.manual_seed(seed)
    limits = limits or PlanLimits()
    work_dir = Path(work_dir) if work_dir is not None else None
    _check_stages(stages, limits.params_target)
    batches = _check_batches(calibration_batches)
    source = LayerSource(str(source_dir), attn_implementation)
    _check_source(source, stages)
    adapter = source.adapter
    executor = executor or LocalStreamExecutor()
    spec = _spec(source_dir, device, compute_dtype, attn_implementation, torch_threads)
    names = stage_names(stages)
    plans: list[PrunePlan] = []
    model = copy.deepcopy(source.dense)  # meta: shapes, costs and config of the current model
    start = time.monotonic()
    with Heartbeat(log) as beat:
        beat.say(
            f"streamed pruning of {source_dir}: {len(stages)} stage(s), {len(batches)} batches"
        )
        try:
            executor.start(spec, batches)
            for idx, stage in enumerate(stages):
                request = EstimateRequest(stage.kind, stage.criterion)
                t0 = time.monotonic()
                scores, _ = stream_pass(executor, plans, request, heartbeat=beat)
                plan = plan_stage(
                    model, adapter, stages, idx, scores, limits=limits, version_in=idx
                )
                if stage.compensation.active:
                    beat.status = f"stage {names[idx]}: compensation ({stage.compensate})"
                    compensate(
                        executor, plans, plan, stage.compensation, heartbeat=beat,
                        adds_bias=adds_out_proj_bias(model, adapter, stage),
                    )  # fmt: skip
                    _spill(plan, work_dir, idx)
                apply_plan(model, adapter, plan)
                plans.append(plan)
                beat.say(
                    f"stage {names[idx]} ({stage.kind}, {stage.criterion}): removed "
                    f"{plan.removed_units()} unit(s), {plan.params_to_remove} params; "
                    f"{param_count(model)} left ({time.monotonic() - t0:.1f} s)"
                )
        finally:
            executor.close()
        beat.status = "streamed write"
        write_streamed_checkpoint(
            source,
            plans,
            out_dir,
            max_shard_size=max_shard_size,
            require_uniform=require_uniform,
            metadata=metadata,
            log=beat.say,
        )
        beat.say(f"streamed pruning done in {time.monotonic() - start:.1f} s")
    return plans
