"""Shared fixtures: a per-session model cache so built-in demo models train once per test run."""

import os

import pytest
import torch

# One thread: tiny models gain nothing from two, and on a shared 2-core box two threads per
# process oversubscribe the cores (measured 20x slower under load).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session", autouse=True)
def _session_model_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cascade-cache")
    _share_prepared_smollm2(cache)
    old = os.environ.get("CASCADE_CACHE")
    os.environ["CASCADE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("CASCADE_CACHE", None)
    else:
        os.environ["CASCADE_CACHE"] = old


def _share_prepared_smollm2(cache) -> None:
    """Link the SmolLM2 folder `launch.sh setup` converted into the session cache (read-only use),
    so the slow SmolLM2 tests do not convert the 135M model again (~50 s on 2 cores)."""
    from runner import smollm2

    try:
        prepared = smollm2.cached_dir()  # $CASCADE_CACHE or ~/.cache/cascade, before the override
        target = smollm2.cached_dir(cache)
    except Exception:  # noqa: BLE001 - package missing: the tests that need it say so themselves
        return
    if (prepared / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(prepared, target_is_directory=True)


TINY_DATA = {"samples_per_class_per_load": 6, "calibration_size": 24}


def tiny_job(model="demo-tiny-gpt2", **overrides) -> dict:
    """A small but complete cascade job as a raw config dict."""
    raw = {
        "name": "tiny",
        "models": [model],
        "data": dict(TINY_DATA),
        "calibration": {"batch_size": 8},
        "target": {"ratio": 2.0},
        "stages": [
            {"kind": "layers", "criterion": "block_influence", "count": 1},
            {"kind": "recover", "steps": 4, "batch_size": 8},
            {"kind": "heads", "criterion": "taylor", "count": 1},
            {"kind": "recover", "steps": 4, "batch_size": 8},
            {"kind": "channels", "criterion": "wanda", "share": 1.0},
            {"kind": "recover", "steps": 4, "batch_size": 8},
        ],
        "sia": {"pairs": 3},
        "output": {"progress": False},
    }
    raw.update(overrides)
    return raw
