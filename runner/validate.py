"""Does a pruned checkpoint fit an edge device? Analytic memory, a measured run, a roofline.

The measured run is `runner.inference_probe` (a separate process, so the caller's own memory
never pollutes the figure). The measuring machine is a proxy for the target: memory is what the
same weights and workload need; speed on the device is the roofline of stages.memory_model,
which also gives the analytic estimate.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from runner.devices import load_device, resolve_budget
from runner.inference_probe import ProbeError, measure_inference
from runner.models import (
    check_safetensors,
    model_file_errors,
    read_config_json,
    read_model_config,
    source_dir,
)
from stages import memory_model as mm
from stages.checkpoint import (
    MANIFEST,
    CheckpointError,
    save_checkpoint,
    verify_manifest,
)

GIB = 1024**3


class ValidationFailed(RuntimeError):
    """The model does not fit the device budget (the message says by how much)."""


# ---- validation -----------------------------------------------------------------------------------
def _measure_or_none(ref, measure: bool, **kwargs) -> tuple[dict | None, str | None]:
    if not measure or ref is None:
        return None, None
    try:
        return measure_inference(ref, **kwargs), None
    except ProbeError as exc:
        return None, str(exc)


def available_host_bytes() -> int | None:
    """MemAvailable of this machine (None where /proc/meminfo is not there)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def too_big_to_measure(estimate: mm.MemoryEstimate, workload: dict, on: str) -> str | None:
    """Why a probe must not run here: what it would allocate on this host (the whole estimate on
    CPU, the token ids on CUDA) exceeds half its free memory, which would swap or wake the OOM
    killer instead of measuring anything. None: safe to measure."""
    host = estimate.total if on == "cpu" else 16 * workload["batch"] * workload["seq_len"]
    free = available_host_bytes()
    if free is None or host <= free // 2:
        return None
    return (
        f"not measured: the workload needs about {host / GIB:,.1f} GiB on this machine "
        f"(analytic), more than half of its {free / GIB:,.1f} GiB free"
    )


def _figures(run: dict | None, shape: mm.ModelShape | None, profile, workload: dict) -> dict:
    """One model's side of the comparison: measured run (if any), analytic estimate, roofline."""
    if shape is None:
        return {"peak": None, "oom": False, "latency": None, "analytic": None, "roof": {}}
    batch, seq_len = workload["batch"], workload["seq_len"]
    nbytes = mm.dtype_bytes(workload["dtype"])
    ok = run is not None and not run["oom"]
    return {
        "peak": run["peak_bytes"] if ok else None,
        "oom": bool(run and run["oom"]),
        "latency": run["latency_ms"] if ok else None,
        "analytic": mm.estimate_memory(shape, batch, seq_len, nbytes),
        "roof": mm.roofline(
            shape, profile.bandwidth_bytes_per_s, profile.bf16_flops, batch, seq_len, nbytes
        ),
    }


def validate_model(
    path: str | Path,
    shape: mm.ModelShape,
    dense_shape: mm.ModelShape | None,
    *,
    device: str,
    fraction: float | None = None,
    budget_bytes: int | None = None,
    batch: int = 1,
    seq_len: int = 128,
    dtype: str = "float32",
    dense_ref: str | Path | None = None,
    measure: bool = True,
    measure_device: str | None = None,
    repeats: int = 5,
) -> dict:
    """Core of validate_checkpoint / validate_for_job once the shapes are known."""
    profile = load_device(device)
    budget = resolve_budget(device, fraction, budget_bytes)
    workload = {"batch": batch, "seq_len": seq_len, "dtype": dtype}
    on = measure_device or ("cuda" if torch.cuda.is_available() else "cpu")
    probe = dict(workload, device=on, repeats=repeats)
    analytic = mm.estimate_memory(shape, batch, seq_len, mm.dtype_bytes(dtype))
    note = too_big_to_measure(analytic, workload, on) if measure else None
    pruned_run, error = _measure_or_none(path, measure and not note, budget_bytes=budget, **probe)
    if error and analytic.total <= budget:
        raise ProbeError(error)
    note = note or (error and f"measurement failed, the analytic peak is over budget: {error}")
    dense_run, dense_error = _measure_or_none(dense_ref, measure and not note, **probe)
    p = _figures(pruned_run, shape, profile, workload)
    d = _figures(dense_run, dense_shape, profile, workload)
    needed = p["peak"] if p["peak"] is not None else p["analytic"].total
    both_measured = p["peak"] is not None and d["peak"] is not None
    d_analytic = d["analytic"].total if d["analytic"] else None
    return {
        "device": profile.name,
        "budget_bytes": budget,
        "peak_bytes": p["peak"] if p["peak"] is not None else p["analytic"].total,
        "measured_peak_bytes": p["peak"],
        "analytic_bytes": p["analytic"].total,
        "fits": not p["oom"] and needed <= budget,
        "oom": p["oom"],
        "headroom_bytes": None if p["oom"] else budget - needed,
        "fits_basis": "oom" if p["oom"] else ("measured" if p["peak"] is not None else "analytic"),
        "dense_peak_bytes": d["peak"] if d["peak"] is not None else d_analytic,
        "dense_peak_source": "measured"
        if d["peak"] is not None
        else ("analytic" if d_analytic else None),
        "latency_ms": {"dense": d["latency"], "pruned": p["latency"]},
        "reductions": {
            "peak_memory": mm.reduction(d["peak"], p["peak"])
            if both_measured
            else mm.reduction(d_analytic, p["analytic"].total),
            "latency": mm.reduction(d["latency"], p["latency"]),
        },
        **{
            f"projected_{key}": {"dense": d["roof"].get(key), "pruned": p["roof"][key]}
            for key in ("tokens_per_s", "tokens_per_s_realistic", "samples_per_s")
        },
        "realism_factor": mm.REALISM_FACTOR,
        "analytic": {
            "pruned": p["analytic"].to_dict(),
            "dense": d["analytic"] and d["analytic"].to_dict(),
        },
        "workload": workload,
        "measured_on": on if pruned_run else None,
        "params": {"pruned": shape.params, "dense": dense_shape.params if dense_shape else None},
        "dense_measure_error": dense_error,
        "measure_note": note,
    }


def validate_checkpoint(
    path: str | Path,
    device: str,
    *,
    fraction: float | None = None,
    budget_bytes: int | None = None,
    batch: int = 1,
    seq_len: int = 128,
    dense_path: str | Path | None = None,
    measure: bool = True,
    dtype: str | None = None,
    measure_device: str | None = None,
    repeats: int = 5,
    verify: bool = True,
) -> dict:
    """Fit verdict, measured/analytic peak memory, latency and roofline for one checkpoint.

    A cascade checkpoint (a "pruning" section or a manifest.json) is verified against its
    manifest first unless verify=False; every folder must hold readable safetensors weights.

    Without dense_path the dense figures are analytic, from config.pruning.dense_params (the
    dense KV cache/workspace taken equal to the pruned one's: a lower bound, so the reported
    memory reduction is conservative); dense latency is then unknown (None).
    """
    resolve_budget(device, fraction, budget_bytes)  # fail fast on an unknown device or a bad budget
    path = check_model_dir(path, verify=verify)
    meta, shape = _shape_of(path)
    mm.check_seq_len(meta, seq_len, str(path))
    with model_file_errors(path, "config.json names no usable dtype"):
        dtype = dtype or mm.stored_dtype(meta)
        mm.dtype_bytes(dtype)
    dense_shape = None
    if dense_path is not None:
        dense_path = check_model_dir(dense_path, verify=verify)
        dense_shape = _shape_of(dense_path)[1]
    elif (getattr(meta.config, "pruning", None) or {}).get("dense_params"):
        dense_shape = dataclasses.replace(shape, params=int(meta.config.pruning["dense_params"]))
    options = dict(fraction=fraction, budget_bytes=budget_bytes, batch=batch, seq_len=seq_len)
    options |= dict(dtype=dtype, measure=measure, measure_device=measure_device, repeats=repeats)
    return validate_model(path, shape, dense_shape, device=device, dense_ref=dense_path, **options)


def _shape_of(path: Path):
    """(meta model, ModelShape) of a checked folder; a config.json the architecture cannot be
    built from is one ModelError line."""
    what = (
        "the model config.json describes cannot be built; restore the checkpoint's own config.json"
    )
    with model_file_errors(path, what):
        meta = mm.meta_model(path)
        return meta, mm.model_shape(meta)


def check_model_dir(path: str | Path, *, verify: bool = True) -> Path:
    """The folder as an absolute path (the probe runs elsewhere), after the checks every loader
    makes: config.json a JSON object, weights in readable safetensors, and for a cascade
    checkpoint (a "pruning" section or a manifest) every file as its manifest records it."""
    directory = Path(path).expanduser().absolute()
    raw = read_config_json(directory)
    if verify and ("pruning" in raw or (directory / MANIFEST).exists()):
        try:
            verify_manifest(directory)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}: the files are not the ones exported; export the checkpoint again (or "
                "skip this check with --no-verify)"
            ) from None
    check_safetensors(directory)
    read_model_config(directory)
    return directory


def validate_for_job(exported_model, dense_params: int, job_cfg, model_cfg) -> dict:
    """What a job reports: workload batch 1 x model max_length in the job's dtype.

    The pruned checkpoint is measured from the exported directory; the dense model from the
    job's model reference (demo name or path) when it loads, else analytically from
    dense_params. Set CASCADE_VALIDATE_MEASURE=0 for analytic figures only.
    """
    target = job_cfg.target
    measure = os.environ.get("CASCADE_VALIDATE_MEASURE", "1") != "0"
    shape = mm.model_shape(exported_model)
    dense_shape = dataclasses.replace(shape, params=max(int(dense_params), shape.params))
    common = dict(
        device=target.device,
        fraction=target.fraction,
        budget_bytes=target.budget_bytes,
        batch=1,
        seq_len=model_cfg.max_length,
        dtype=model_cfg.dtype,
        dense_ref=source_dir(model_cfg.ref) or model_cfg.ref,  # built-in LLMs: their folder
        measure=measure,
    )
    path = Path(str(getattr(exported_model, "name_or_path", "") or ""))
    if (path / "config.json").is_file():
        return validate_model(path, shape, dense_shape, **common)
    with tempfile.TemporaryDirectory(prefix="cascade-validate-") as tmp:
        saved = save_checkpoint(exported_model, None, Path(tmp) / "checkpoint")
        return validate_model(saved, shape, dense_shape, **common)


def check_fits(validation: dict) -> None:
    """Raise ValidationFailed (naming the shortfall) when a validation dict says does-not-fit."""
    if validation.get("fits", True):
        return
    budget = validation["budget_bytes"]
    device = validation["device"]
    if validation.get("oom"):
        raise ValidationFailed(
            f"{device}: ran out of memory under the {budget / GIB:.2f} GiB budget "
            f"(analytic estimate {validation['analytic_bytes'] / GIB:.2f} GiB)"
        )
    needed = budget - validation["headroom_bytes"]
    over = needed - budget
    raise ValidationFailed(
        f"{device}: model needs {needed / GIB:.3f} GiB ({validation['fits_basis']}) but the budget is "
        f"{budget / GIB:.3f} GiB: {over / GIB:.3f} GiB ({over / budget:.1%}) over"
    )


def params_for_budget(model, target_cfg, job_cfg) -> int:
    """Largest parameter count whose analytic inference memory fits the target budget.

    Assumptions: batch 1 at the longest max_length of the job's models, the model's current
    dtype, and the KV cache/workspace of the DENSE model (pruning only shrinks them, so the
    answer is conservative). Raises ValidationFailed if even those alone exceed the budget.
    """
    budget = resolve_budget(target_cfg.device, target_cfg.fraction, target_cfg.budget_bytes)
    shape = mm.model_shape(model)
    nbytes = next(model.parameters()).element_size()
    seq_len = max(m.max_length for m in job_cfg.models)
    estimate = mm.estimate_memory(shape, 1, seq_len, nbytes)
    overhead = estimate.kv_cache + estimate.workspace + shape.buffer_bytes
    params = mm.max_params_for_budget(budget, overhead, nbytes)
    if params <= 0:
        raise ValidationFailed(
            f"target {target_cfg.device or 'budget'}: budget {budget} bytes is below the KV cache + "
            f"activation workspace ({overhead} bytes at seq {seq_len}) before any weights"
        )
    return min(shape.params, params)
