"""Fine-tune a pretrained model's new task head before pruning, once per setting.

Fine-tuning MiniLM costs minutes on CPU and is identical for every job that names the same model,
settings, seed and training data (a compare runs one job per method and ratio, a family re-runs
after a failure), so the trained weights are cached beside the demo models, keyed by all of those
and by the source checkpoint's files.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from runner.demo_models import training_data_cfg
from runner.models import source_dir
from runner.paths import cache_root, dir_name_for_ref
from runner.progress import step_bar
from stages.atomic import atomic_directory
from stages.objectives import get_objective
from stages.training import TrainSettings, train_steps, training_loss

FINETUNE_BATCH = 16
FINETUNE_CODE = "finetune-v1"  # bump when the fine-tuning recipe changes, to invalidate caches


def _source_fingerprint(ref: str) -> list:
    """Names, sizes and mtimes of the source checkpoint's files: replaced weights miss the cache."""
    path = source_dir(ref)
    if path is None:
        return []
    return sorted(
        (p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.iterdir() if p.is_file()
    )


def finetune_cache_key(model, model_cfg, seed: int, data_cfg) -> str:
    payload = {  # the model's `name` only says where a job writes, not what is trained
        "model": model_cfg.model_dump(mode="json", exclude={"name"}),
        "source": _source_fingerprint(model_cfg.ref),
        "num_labels": getattr(model.config, "num_labels", None),
        "seed": seed,
        "batch": FINETUNE_BATCH,
        "data": training_data_cfg(data_cfg).model_dump(mode="json") if data_cfg else None,
        "code": FINETUNE_CODE,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _cache_dir(model, model_cfg, seed: int, data_cfg) -> Path:
    key = finetune_cache_key(model, model_cfg, seed, data_cfg)
    return cache_root() / "finetuned" / f"{dir_name_for_ref(model_cfg.ref)}-{key}"


def _save(model, record: dict, target: Path) -> None:
    """Weights and record written atomically; a concurrent job's identical entry wins the race."""
    with atomic_directory(target, keep_existing=True) as tmp:
        save_safetensors(model, str(tmp / "model.safetensors"))
        (tmp / "finetune.json").write_text(json.dumps(record, indent=2))


def _load_cached(model, cached: Path, log) -> dict | None:
    """The cached record after loading its weights into `model`; None (fine-tune again) when the
    entry cannot be read: the cache only saves time, a damaged entry must not stop the job."""
    try:  # everything is checked before the first weight is copied into `model`
        record = json.loads((cached / "finetune.json").read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("finetune.json is not a JSON object")
        state = load_file(str(cached / "model.safetensors"))
        _check_matches(model, state)
    except (OSError, ValueError, SafetensorError) as exc:
        log(f"WARNING: ignoring the unreadable fine-tune cache {cached} ({exc}); fine-tuning again")
        return None
    load_safetensors(model, str(cached / "model.safetensors"), strict=True)
    model.eval()
    return record


def _check_matches(model, state: dict) -> None:
    """Every cached tensor names a parameter of the same shape, and every parameter not cached
    shares its storage with one that is (tied weights are saved once)."""
    current = model.state_dict()
    wrong = [k for k, v in state.items() if k not in current or current[k].shape != v.shape]
    stored = {current[k].untyped_storage().data_ptr() for k in state if k in current}
    missing = [
        k
        for k, v in current.items()
        if k not in state and v.untyped_storage().data_ptr() not in stored
    ]
    if wrong or missing:
        raise ValueError(f"tensors do not match the model: {(wrong + missing)[:3]}")


def finetune_dense(
    model, train_split, model_cfg, seed: int, progress: bool, log, *, data_cfg=None
) -> dict | None:
    """Pretrained models (e.g. MiniLM) get a task head; train the dense model before pruning."""
    steps = model_cfg.finetune_steps
    if steps == 0:
        return None
    cached = _cache_dir(model, model_cfg, seed, data_cfg)
    if (cached / "finetune.json").is_file():
        record = _load_cached(model, cached, log)
        if record is not None:
            log(f"reused the dense model fine-tuned for {steps} steps from {cached}")
            return record | {"cached": True}
    t0 = time.perf_counter()
    settings = TrainSettings(
        steps=steps, lr=model_cfg.finetune_lr, batch_size=FINETUNE_BATCH, seed=seed
    )
    with step_bar(steps, f"{model_cfg.ref} fine-tune", progress, log=log) as on_step:
        loss_fn = training_loss(get_objective("classification"), settings, None)
        losses = train_steps(model, train_split, settings, loss_fn, on_step=on_step)
    model.eval()
    log(
        f"fine-tuned the dense model for {steps} steps in {time.perf_counter() - t0:.1f}s "
        f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})"
    )
    record = {
        "steps": steps,
        "lr": model_cfg.finetune_lr,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    try:
        _save(model, record, cached)
    except (OSError, SafetensorError) as exc:  # the cache only saves time: a full disk must
        # not cost the trained model (safetensors reports ENOSPC as a SafetensorError)
        log(f"WARNING: could not cache the fine-tuned weights in {cached.parent}: {exc}")
    return record | {"cached": False}
