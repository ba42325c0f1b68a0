"""Batch dispatch on Ray: one task per job, reserving the job's CPUs/GPUs; Ray queues the rest."""

from __future__ import annotations

import math

import ray

from cluster.ray_session import connect


def dispatch_on_ray(
    todo: list, task_fn, on_result, *, cpus: float, gpus: float, limit: int, address, env: dict, log
) -> None:
    """One Ray task per job, reserving the job's CPUs/GPUs; Ray queues what does not fit."""
    started_here = connect(address, env_vars=env)
    total = ray.cluster_resources()
    cpus = min(cpus, total.get("CPU", cpus))
    gpus = min(gpus, total.get("GPU", 0.0))
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(task_fn)
    threads = max(1, math.floor(cpus))
    room = min(
        total.get("CPU", 1) // cpus if cpus else limit,
        total.get("GPU", 0) // gpus if gpus else limit,
    )
    log(
        f"[batch] Ray: {len(todo)} job(s) of {cpus:g} CPU / {gpus:g} GPU; {min(limit, int(room))} at once"
    )
    waiting, running = list(todo), {}
    try:
        while waiting or running:
            while waiting and len(running) < limit:
                e = waiting.pop(0)
                running[task.remote(*e.args(threads))] = e
                log(f"[batch] {e.name}: submitted")
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                entry = running.pop(ref)
                try:
                    entry.result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a crashed worker fails only its model
                    first = (str(exc).strip().splitlines() or [""])[0]
                    entry.result = {"status": "failed", "error": f"{type(exc).__name__}: {first}"}
                on_result(entry, log)
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
