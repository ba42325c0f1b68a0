"""Distributed recovery: stages.recover's LoRA recovery as a Ray Train TorchTrainer job (DDP/ZeRO).

Same LoRA config, loss, optimiser and schedule as the in-process `recover`; each worker trains a
DistributedSampler-style shard with batch ceil(batch_size / workers), so global batch and steps
match, and DDP (gloo on CPU, nccl on GPU) averages gradients: one worker reproduces the in-process
weights exactly (tested). The model reaches workers once (checkpoint files in the object store);
each pass over a shard ends with a resumable checkpoint, so FailureConfig(max_failures=1) resumes
a killed worker group. Rank 0 reports the LoRA-merged weights; the driver loads them in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from cluster.ray_session import connect
from cluster.train_loop import (
    MERGED_FILE,
    METHODS,
    PROGRESS_FILE,
    STRATEGIES,
    DeepSpeedStepper,
    DistributedRecoveryError,
    per_worker_batch_size,
    require_deepspeed,
    shard_indices,
)
from stages.arch import get_adapter
from stages.checkpoint import load_pruned, save_checkpoint
from stages.objectives import Teacher, get_objective
from stages.recover import RecoverySettings, prepare_trainable
from stages.split import EncodedSplit
from stages.training import TorchStepper, run_steps, steps_per_epoch, training_loss

STORAGE_ENV = "CASCADE_RAY_STORAGE"


# ---- Ray Train worker ----------------------------------------------------------------------------
def _model_files(model: nn.Module) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="cascade-train-") as tmp:
        out = save_checkpoint(model, None, Path(tmp) / "model")
        return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def _model_from_files(files: dict[str, bytes], attn_implementation: str | None) -> nn.Module:
    with tempfile.TemporaryDirectory(prefix="cascade-train-") as tmp:
        for name, blob in files.items():
            (Path(tmp) / name).write_bytes(blob)
        return load_pruned(tmp, attn_implementation=attn_implementation)


def _report(metrics: dict, directory: Path | None) -> None:
    checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
    ray.train.report(metrics, checkpoint=checkpoint)


def _maybe_inject_fault(fault: dict | None, last_rank: bool, epochs_done: int) -> None:
    """Test hook: the last worker kills its own process once, after `fault["epoch"]` epochs."""
    if (
        not fault
        or not last_rank
        or epochs_done != fault["epoch"]
        or Path(fault["marker"]).exists()
    ):
        return
    Path(fault["marker"]).write_text(str(epochs_done))
    ray.train.get_all_reported_checkpoints(timeout_s=60)  # wait until the epoch's is registered
    os._exit(1)  # a killed worker, not a Python exception


def _make_stepper(strategy: str, trained, trainable, settings, batch_size, device, world):
    train_settings = settings.train_settings()
    if strategy != "ddp":
        return DeepSpeedStepper(trained, trainable, train_settings, int(strategy[-1]), batch_size)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        trained = DistributedDataParallel(trained, device_ids=ids)
    return TorchStepper(trained, trainable, train_settings)


def _resume(stepper) -> tuple[int, list[float]]:
    """(step, losses) of this run's last epoch checkpoint, loading the trainer state from it."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        progress = json.loads((Path(directory) / PROGRESS_FILE).read_text())
        stepper.load(Path(directory))
    return progress["step"], progress["losses"]


def _worker_main(config: dict) -> None:

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    payload = ray.get(config["payload"])
    settings, device, split = (
        RecoverySettings(**payload["settings"]),
        get_device(),
        payload["split"],
    )
    model = _model_from_files(payload["model_files"], payload["attn_implementation"])
    trained, trainable = prepare_trainable(model, get_adapter(model), settings)
    trained.to(device).train()
    trainable_params = sum(p.numel() for p in trainable)  # before ZeRO-3 partitions them
    rows, batch_size = (
        shard_indices(len(split), rank, world),
        per_worker_batch_size(settings.batch_size, world),
    )
    stepper = _make_stepper(
        config["strategy"], trained, trainable, settings, batch_size, device, world
    )
    resume = _resume(stepper)

    def average(loss: Tensor) -> float:
        value = loss.detach().float().reshape(1).to(device)
        if world > 1:
            torch.distributed.all_reduce(value)
        return float(value) / world

    def on_epoch(step: int, losses: list[float]) -> None:
        with tempfile.TemporaryDirectory(prefix="cascade-epoch-") as tmp:
            wrote = stepper.save(Path(tmp), rank)
            if rank == 0:
                (Path(tmp) / PROGRESS_FILE).write_text(json.dumps({"step": step, "losses": losses}))
            _report({"step": step, "loss": losses[-1]}, Path(tmp) if wrote else None)
        epochs = step // steps_per_epoch(len(rows), batch_size)
        _maybe_inject_fault(config.get("fault"), rank == world - 1, epochs)

    objective = get_objective(payload["objective"])
    loss_fn = training_loss(objective, settings.train_settings(), payload["teacher"])
    losses = run_steps(stepper, split.subset(rows), settings.train_settings(), loss_fn, rows=rows,
                       batch_size=batch_size, resume=resume, average=average, on_epoch=on_epoch)  # fmt: skip
    state = stepper.final_state(rank, settings.method == "lora")
    metrics = {
        "losses": losses,
        "resumed_from_step": resume[0],
        "trainable_params": trainable_params,
    }
    with tempfile.TemporaryDirectory(prefix="cascade-final-") as tmp:
        if state is not None:
            save_file(state, str(Path(tmp) / MERGED_FILE))
        _report(metrics, Path(tmp) if state is not None else None)


# ---- driver --------------------------------------------------------------------------------------
def _validate(
    settings: RecoverySettings, teacher: Teacher | None, rows: int, strategy: str
) -> None:
    where = "recover_distributed"
    if strategy not in STRATEGIES:
        raise DistributedRecoveryError(f"{where}: unknown strategy {strategy!r}; use {STRATEGIES}")
    if settings.method not in METHODS:
        raise DistributedRecoveryError(f"{where}: method {settings.method!r} needs runner: local")
    if settings.loss == "kd" and teacher is None:
        raise DistributedRecoveryError(f"{where}: kd recovery needs a teacher")
    if teacher is not None and hasattr(teacher, "__len__") and len(teacher) != rows:
        raise DistributedRecoveryError(f"{where}: {len(teacher)} teacher rows, {rows} rows")
    settings.train_settings().validate()
    if strategy != "ddp":
        require_deepspeed()


def _check_capacity(cluster_cfg) -> None:
    """On an embedded Ray, fail fast instead of waiting for CPUs that other actors hold."""
    need, free = (
        cluster_cfg.workers * cluster_cfg.cpus_per_worker,
        ray.available_resources().get("CPU", 0),
    )
    if not getattr(cluster_cfg, "address", None) and free + 1e-9 < need:
        raise DistributedRecoveryError(
            f"recover_distributed: {cluster_cfg.workers} Ray Train workers need {need:g} CPUs, local Ray "
            f"has {free:g} free; lower cluster.workers / cluster.cpus_per_worker or give Ray more CPUs"
        )


def _storage_root() -> str | None:
    """$CASCADE_RAY_STORAGE; required when the cluster spans machines (Ray Train writes each
    worker's checkpoint where the driver must read it back, so a local temp dir will not do)."""
    root = os.environ.get(STORAGE_ENV)
    if root:
        return root
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if len(hosts) > 1:
        raise DistributedRecoveryError(
            f"recover_distributed: the Ray cluster spans {len(hosts)} machines; set "
            f"{STORAGE_ENV} to a directory every node mounts (shared filesystem) for Ray Train's "
            "checkpoints (docs/CLUSTER.md)"
        )
    return None


def _fit(payload, cluster_cfg, strategy: str, fault: dict | None, storage: Path):
    gpus, cpus = cluster_cfg.gpus_per_worker, cluster_cfg.cpus_per_worker
    resources = {"CPU": cpus} | ({"GPU": gpus} if gpus > 0 else {})
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={
            "payload": payload,
            "strategy": strategy,
            "fault": fault,
            "threads": max(1, int(cpus)),
        },
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cluster_cfg.workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name="recover",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=1),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None or result.checkpoint is None:
        raise DistributedRecoveryError(
            f"recover_distributed: Ray Train run failed ({result.error})"
        )
    with result.checkpoint.as_directory() as directory:
        return load_file(str(Path(directory) / MERGED_FILE)), result.metrics


def recover_distributed(
    model: nn.Module,
    adapter,
    split: EncodedSplit,
    settings: RecoverySettings,
    objective_name: str,
    teacher: Teacher | None,
    cluster_cfg,
    strategy: str = "ddp",
    *,
    fault: dict | None = None,
) -> tuple[nn.Module, dict]:
    """(model, metrics) like stages.recover.recover; `model` is updated in place.

    fault: test hook {"epoch": e, "marker": path}: the last worker kills itself once after epoch e.
    Checkpoints go under $CASCADE_RAY_STORAGE (required when the cluster spans several machines:
    a directory every node mounts) or a local temp dir, removed afterwards. `adapter` is unused: workers rebuild it from the model.
    """
    _validate(settings, teacher, len(split), strategy)
    started, metrics = time.perf_counter(), {"losses": [], "trainable_params": 0}
    if settings.steps > 0:
        connect(cluster_cfg.address, cpus=cluster_cfg.workers * cluster_cfg.cpus_per_worker)
        _check_capacity(cluster_cfg)
        attn = getattr(model.config, "_attn_implementation", None)
        payload = ray.put({"model_files": _model_files(model), "attn_implementation": attn,
                           "split": split, "teacher": teacher, "objective": objective_name,
                           "settings": asdict(settings)})  # fmt: skip
        root = _storage_root()
        storage = Path(tempfile.mkdtemp(prefix="cascade-ray-train-", dir=root))
        try:
            state, metrics = _fit(payload, cluster_cfg, strategy, fault, storage)
        finally:
            shutil.rmtree(storage, ignore_errors=True)
        model.load_state_dict(state, strict=True)
    model.eval()
    losses = list(metrics["losses"])
    first, last = (losses[0], losses[-1]) if losses else (None, None)
    return model, {"losses": losses, "seconds": time.perf_counter() - started, "first_loss": first,
                   "last_loss": last, "trainable_params": metrics["trainable_params"],
                   "workers": cluster_cfg.workers, "strategy": strategy,
                   "resumed_from_step": metrics.get("resumed_from_step", 0)}  # fmt: skip
