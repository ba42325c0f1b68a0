"""Fuzzing (derandomized; `./launch.sh fuzz` explores): any mutated job file is accepted or rejected with ConfigError; any command line ends in
an exit status with at most one `error:` line; any damaged model folder loads or is refused in one
line (docs/ERRORS.md)."""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_job
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.config import ConfigError, load_config, parse_config

# CI and `./launch.sh test` run the same cases every time (derandomized: a fresh clone must not
# fail on a newly drawn case); `./launch.sh fuzz` (CASCADE_FUZZ=explore) draws fresh ones, ten
# times as many. What it finds becomes a fixed case (tests/test_errors_probe.py) and a fix.
EXPLORE = os.environ.get("CASCADE_FUZZ") == "explore"


def fuzz_settings(max_examples: int):
    return settings(
        max_examples=max_examples * (10 if EXPLORE else 1),
        derandomize=not EXPLORE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


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


@fuzz_settings(300)
@given(st.sampled_from(ALL_PATHS), values, st.sampled_from(["set", "delete", "add"]))
def test_mutated_configs_never_raise_anything_but_config_error(path, value, mode):
    accepts_or_config_error(mutate(BASE, path, value, mode))


@fuzz_settings(150)
@given(st.text(max_size=200))
def test_arbitrary_yaml_text_is_handled(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "job.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError:
        pass


@fuzz_settings(100)
@given(st.lists(st.text(max_size=20), max_size=3))
def test_arbitrary_overrides_are_handled(tmp_path_factory, overrides):
    path = tmp_path_factory.mktemp("fuzz") / "job.yaml"
    path.write_text(yaml.safe_dump(BASE))
    try:
        load_config(path, overrides)
    except ConfigError:
        pass


# ---- the command line: any arguments give an exit status, never a traceback --------------------
# Files and folders the arguments pick from (good ones and every kind of bad one); the work behind
# the commands is stubbed, so only arguments, files, output paths and validation are exercised.
POOL_FILES = {
    "job.yaml": lambda p: p.write_text(yaml.safe_dump(BASE)),
    "empty.yaml": lambda p: p.write_text(""),
    "list.yaml": lambda p: p.write_text("- 1\n- 2\n"),
    "latin.yaml": lambda p: p.write_bytes(b"name: caf\xe9\n"),
    "binary.yaml": lambda p: p.write_bytes(bytes(range(256))),
    "dir.yaml": lambda p: p.mkdir(),
    "a_file": lambda p: p.write_text("x"),
    "loop": lambda p: p.symlink_to(p),
    "compare.yaml": lambda p: shutil.copy("configs/compare_demo.yaml", p),
    "family.yaml": lambda p: shutil.copy("configs/families/demo.yaml", p),
}
GOOD_FILE = {"run": "job.yaml", "check": "job.yaml", "sia": "job.yaml", "submit": "job.yaml"}
GOOD_FILE |= {"compare": "compare.yaml", "batch": "family.yaml", "validate": "ckpt"}
VALUES = [
    "0", "-1", "2", "nan", "inf", "1e400", "1e23", "abc", "", "0.5", "1000000000", "a=b", "=",
    "name=../x", "seed=1e23", "cluster.workers=1000", "data.snr_db=.nan", "stages=7",
    "stages.0.count=1", "models=[]", "\x00", "é", "1,2", "2,nan", ",", "cascade,nope", "int8",
]  # fmt: skip
FLAGS = {
    "run": ["-o P", "--resume", "--force", "--set V", "--quiet"],
    "check": ["--set V", "--show"],
    "sia": ["--set V", "--json"],
    "compare": ["--methods V", "--ratios V", "-o P", "--set V"],
    "batch": ["-o P", "--resume", "--concurrency V", "--local", "--set V"],
    "validate": [
        "--fraction V",
        "--budget-bytes V",
        "--batch V",
        "--seq-len V",
        "--dtype V",
        "--dense P",
        "--analytic-only",
        "--json",
        "--no-verify",
    ],  # fmt: skip
    "submit": ["--set V", "--token-file P", "--follow"],
    "models": [],
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from tiny_models import tiny_gpt2, tiny_tokenizer

    from stages.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("pool")
    for name, make in POOL_FILES.items():
        make(root / name)
    save_checkpoint(tiny_gpt2(), tiny_tokenizer(), root / "ckpt")
    names = [*POOL_FILES, "ckpt", "missing", "a_file/x", "loop/x", "out", "out/x"]
    return root, [str(root / n) for n in names] + ["", "-", "/", "demo-tiny-gpt2"]


def _stub_the_work(mp) -> None:
    import contextlib

    import runner.cli.batch as cli_batch
    import runner.cli.cluster as cli_cluster
    import runner.cli.main as cli
    import runner.compare as compare
    import runner.job as job
    import runner.validate as validate
    from runner.batch import _claim_output
    from runner.errors import JobError

    def refuse(*args, **kwargs):
        raise JobError("stub: the work itself is not fuzzed")

    def batch(family, out, **kwargs):
        _claim_output(Path(out), family.name)
        refuse()

    measured = {"oom": False, "peak_bytes": 1000, "latency_ms": 1.0, "device": "cpu"}
    mp.setattr(job, "_run_models", lambda *a, **k: {})
    mp.setattr(job, "cluster_session", lambda *a, **k: contextlib.nullcontext())
    mp.setattr(compare, "_run_one", refuse)
    mp.setattr(cli_batch, "run_batch", batch)
    mp.setattr(cli, "sia_for_config", lambda cfg, log: [])
    mp.setattr(validate, "measure_inference", lambda ref, **k: dict(measured))
    for name in ("submit_job", "job_logs", "job_status", "job_message", "stop_job"):
        mp.setattr(cli_cluster, name, lambda *a, **k: "SUCCEEDED")  # nothing leaves this host


@st.composite
def command_lines(draw, paths):
    command = draw(st.sampled_from(sorted(FLAGS)))
    argv = [command]
    if command != "models":
        good = str(Path(paths[0]).parent / GOOD_FILE[command])
        argv.append(draw(st.one_of(st.just(good), st.sampled_from(paths))))
    if command == "validate":
        argv += ["--device", draw(st.sampled_from(["dgx_spark", "pi5", paths[4], paths[5]]))]
    if command == "submit":
        argv += ["--address", "http://127.0.0.1:9"]  # stubbed: never contacted
    for flag in draw(st.lists(st.sampled_from(FLAGS[command] or ["-h"]), max_size=4)):
        name, _, kind = flag.partition(" ")
        argv.append(name)
        if kind:
            values = paths if kind == "P" else VALUES
            argv.append(draw(st.one_of(st.sampled_from(values), st.text(max_size=8))))
    return argv


@fuzz_settings(120)
@given(data=st.data())
def test_any_command_line_ends_in_an_exit_status_never_a_traceback(pool, data):
    import contextlib
    import io

    from runner.cli.main import main

    root, paths = pool
    argv = data.draw(command_lines(paths))
    shutil.rmtree(root / "out", ignore_errors=True)
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        _stub_the_work(mp)
        mp.chdir(root)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: usage line + "error:", status 2
                code = exc.code
    text = err.getvalue()
    assert code in (0, 1, 2, 3), (argv, code, text)
    assert "Traceback" not in text, (argv, text)
    if code == 2 and text and not text.startswith("usage:"):
        assert text.startswith("error:"), (argv, text)
    assert not (root / "runs").exists() or all(
        p.parent == root / "runs" for p in (root / "runs").iterdir()
    ), argv


# ---- model folders: a mutated folder loads, or is refused in one line -------------------------
def _folder_mutation(path: Path, rnd) -> None:
    """One random damage of a saved HF folder: a config value, the config, the weights, the
    tokenizer, extra files. Numbers stay small: a 10**9-layer config would just be a big model."""
    config = path / "config.json"
    kind = rnd.choice(["set", "set", "set", "delete", "config", "weights", "tokenizer", "extra"])
    try:
        raw = json.loads(config.read_bytes())
    except (OSError, ValueError):
        raw = None
    if kind in ("set", "delete") and not isinstance(raw, dict):
        return  # an earlier damage already replaced the config
    if kind == "set":
        key = rnd.choice([*raw, "architectures", "id2label", "pruning", "dtype", "auto_map"])
        raw[key] = rnd.choice(
            [None, True, -3, 0, 1, 7, 70, 2.5, float("nan"), "x", "", [], {}, [1, 2], {"a": 1},
             ["Nope"], ["GPT2LMHeadModel"], {"layout": [{}]}, {str(i): "L" for i in range(3)}]
        )  # fmt: skip
        config.write_text(json.dumps(raw))
    elif kind == "delete" and raw:
        raw.pop(rnd.choice(sorted(raw)))
        config.write_text(json.dumps(raw))
    elif kind == "config":
        config.write_bytes(rnd.choice([b"[]", b"1", b"{", b"\xff\xfe", b'{"model_type": "t5"}']))
    elif kind in ("weights", "tokenizer"):
        file = path / ("model.safetensors" if kind == "weights" else "tokenizer.json")
        data = bytearray(file.read_bytes()) if file.is_file() else b""
        if not data:
            return  # an earlier damage already removed or emptied it
        action = rnd.choice(["truncate", "flip", "delete"])
        if action == "truncate":
            file.write_bytes(bytes(data[: rnd.randrange(len(data))]))
        elif action == "flip":
            data[rnd.randrange(min(len(data), 512))] ^= 1 << rnd.randrange(8)
            file.write_bytes(bytes(data))
        else:
            file.unlink()
    else:
        name = rnd.choice(["pytorch_model.bin", "model.safetensors.index.json", "notes.txt"])
        (path / name).write_text(rnd.choice(["{}", "[]", "x", '{"weight_map": {"a": "b"}}']))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from tiny_models import tiny_gpt2, tiny_tokenizer

    path = tmp_path_factory.mktemp("folder") / "model"
    tiny_gpt2(num_labels=10).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@fuzz_settings(25)
@given(rnd=st.randoms(use_true_random=False), damages=st.integers(1, 3))
def test_mutated_model_folders_load_or_fail_in_one_line(
    model_folder, tmp_path_factory, rnd, damages
):
    import contextlib
    import io

    from runner.cli.main import main
    from runner.errors import user_errors
    from runner.models import load_model

    folder = tmp_path_factory.mktemp("mutated") / "model"
    shutil.copytree(model_folder, folder)
    for _ in range(damages):
        _folder_mutation(folder, rnd)
    try:
        load_model(str(folder), num_labels=10, progress=False)
    except user_errors() as exc:
        assert str(exc).strip() and "Traceback" not in str(exc)
    err = io.StringIO()
    args = ["validate", str(folder), "--device", "dgx_spark", "--analytic-only"]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    assert code in (0, 2, 3), err.getvalue()
    assert code != 2 or err.getvalue().startswith("error:"), err.getvalue()
    shutil.rmtree(folder.parent)
