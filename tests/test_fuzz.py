"""Fuzzing `cascade check`: any mutated job file is either accepted or rejected with ConfigError."""

import copy

import yaml
from conftest import tiny_job
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.config import ConfigError, load_config, parse_config

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["layers", "heads", "channels", "recover", "wanda", "taylor", "ce", "kd"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


def mutate(raw, path, value, mode):
    raw = copy.deepcopy(raw)
    if not path:
        return value
    node = raw
    for p in path[:-1]:
        node = node[p]
    last = path[-1]
    if mode == "delete" and isinstance(node, dict):
        node.pop(last, None)
    elif mode == "add" and isinstance(node, dict):
        node[f"{last}_extra"] = value
    else:
        node[last] = value
    return raw


BASE = tiny_job()
ALL_PATHS = list(paths(BASE))


def accepts_or_config_error(raw):
    try:
        parse_config(raw)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(msg, str) for _, msg in exc.problems)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_PATHS), values, st.sampled_from(["set", "delete", "add"]))
def test_mutated_configs_never_raise_anything_but_config_error(path, value, mode):
    accepts_or_config_error(mutate(BASE, path, value, mode))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_yaml_text_is_handled(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "job.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=3))
def test_arbitrary_overrides_are_handled(tmp_path_factory, overrides):
    path = tmp_path_factory.mktemp("fuzz") / "job.yaml"
    path.write_text(yaml.safe_dump(BASE))
    try:
        load_config(path, overrides)
    except ConfigError:
        pass
