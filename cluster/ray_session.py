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
from ray._private import ray_constants

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
        if _loopback(address):
            _stay_on_loopback()
            kwargs["_node_ip_address"] = "127.0.0.1"
        ray.init(address=address, **kwargs)
        return True
    ray.init(
        address="local",  # a new Ray of our own, even when another one runs on this machine
        num_cpus=max(int(cpus + 0.999), os.cpu_count() or 1),
        include_dashboard=dashboard,
        object_store_memory=OBJECT_STORE_BYTES,
        _node_ip_address="127.0.0.1",
        **kwargs,
    )
    return True


def _loopback(address: str) -> bool:
    """True for a head on this machine's loopback ("127.0.0.1:6379", "ray://localhost:10001")."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost")


def _stay_on_loopback() -> None:
    """Make this driver join a head bound to 127.0.0.1 (`./launch.sh cluster`) over 127.0.0.1.

    Ray 2.60's `ray.init(address=...)` rewrites a loopback address (and `_node_ip_address`) to
    this machine's outward IP (`services.resolve_ip_for_localhost`), where such a head's GCS does
    not listen, and then retries for ever. Ray keeps loopback when its multi-node switch is off
    (the `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` environment variable, read at import): the same
    switch, set here because Ray is already imported. It only changes how this process names its
    own node; the nodes of a local cluster are started with their own --node-ip-address.
    """
    ray_constants.ENABLE_RAY_CLUSTER = False


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
