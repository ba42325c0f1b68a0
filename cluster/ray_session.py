"""The one policy for starting or joining Ray, and the capacity check before any actor starts.

Every Ray user in the project (importance actors, Ray Train recovery, batch dispatch) connects
through `connect`: join `address` or $RAY_ADDRESS (inside a submitted Ray job), else start a quiet
embedded Ray bound to 127.0.0.1. `check_capacity` compares a request with what the cluster has,
so an impossible one fails in seconds with the numbers instead of waiting forever.
"""

from __future__ import annotations

import logging
import os

import ray
import torch

from cluster.executor import ClusterCapacityError

OBJECT_STORE_BYTES = 300 * 1024**2


def connect(
    address: str | None = None,
    *,
    cpus: float = 0,
    dashboard: bool = False,
    env_vars: dict[str, str] | None = None,
) -> bool:
    """Join `address` / $RAY_ADDRESS or start an embedded Ray advertising at least `cpus` CPUs.

    Returns True when this call connected (the caller then shuts Ray down), False when Ray was
    already initialised in this process.
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict = {"log_to_driver": False, "logging_level": logging.WARNING}
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return True
    ray.init(
        num_cpus=max(int(cpus + 0.999), os.cpu_count() or 1),
        include_dashboard=dashboard,
        object_store_memory=OBJECT_STORE_BYTES,
        _node_ip_address="127.0.0.1",
        **kwargs,
    )
    return True


def check_capacity(
    workers: int, cpus_per_worker: float, gpus_per_worker: float, *, embedded: bool
) -> None:
    """Refuse a request the cluster cannot place, naming what it has.

    An embedded Ray advertises whatever it is asked for, so there the real machine is the limit:
    its CPU cores and the GPUs torch sees. On a real cluster, Ray's own resource totals are.
    """
    need_cpu, need_gpu = workers * cpus_per_worker, workers * gpus_per_worker
    if embedded:
        have_cpu, have_gpu = float(os.cpu_count() or 1), float(torch.cuda.device_count())
        where = "this machine (embedded Ray)"
    else:
        total = ray.cluster_resources()
        have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
        where = "the Ray cluster"
    if need_gpu > have_gpu:
        raise ClusterCapacityError(
            f"cluster: {workers} workers x gpus_per_worker={gpus_per_worker:g} need {need_gpu:g} "
            f"GPUs but {where} has {have_gpu:g}; lower cluster.workers or gpus_per_worker "
            "(0 runs on CPUs)"
        )
    if need_cpu > have_cpu:
        raise ClusterCapacityError(
            f"cluster: {workers} workers x cpus_per_worker={cpus_per_worker:g} need {need_cpu:g} "
            f"CPUs but {where} has {have_cpu:g}; lower cluster.workers or cpus_per_worker, or "
            "join a larger cluster with --address"
        )
