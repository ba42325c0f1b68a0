"""Files, folders and disks the user can fix: one `error:` line, exit 2, nothing half-written.

Job files that are not UTF-8 or cannot be read, output paths the OS refuses, model folders that
are not what they claim, tampered checkpoints, a full disk (docs/ERRORS.md).
"""

import errno
import json
import time
from pathlib import Path

import pytest
import torch
from cli_checks import one_line_error, run_cli, write_job
from safetensors import SafetensorError
from tiny_models import tiny_gpt2, tiny_tokenizer

import runner.cli.cluster as cli_cluster
from runner.cli.main import main


def small_job(path: Path, **overrides) -> Path:
    """Two stages, no SIA, no plots: a whole job in about two seconds."""
    stages = [
        {"kind": "layers", "criterion": "block_influence", "count": 1},
        {"kind": "recover", "steps": 2, "batch_size": 8},
        {"kind": "heads", "criterion": "l2", "count": 1},
    ]
    raw = dict(stages=stages, sia={"enabled": False}, target={})
    raw["output"] = {"progress": False, "plots": False}
    return write_job(path, **(raw | overrides))


# ---- job files ----------------------------------------------------------------------------------
COMMANDS = {
    "check": [],
    "run": ["-o", "OUT"],
    "sia": [],
    "compare": ["-o", "OUT"],
    "batch": ["-o", "OUT"],
    "submit": ["--address", "http://127.0.0.1:9"],
}


def _bad_file(kind: str, tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "job.yaml"
    if kind == "not utf-8":
        path.write_bytes(b"name: caf\xe9\n")
    elif kind == "a directory":
        path.mkdir()
    else:  # unreadable: as root a chmod 000 file is still readable, so the read itself fails
        path.write_text("name: x\n")
        real = Path.read_bytes

        def refuse(self):
            if self == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", refuse)
    return path


@pytest.mark.parametrize("kind", ["not utf-8", "a directory", "unreadable"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_job_files_that_cannot_be_read(command, kind, tmp_path, capsys, monkeypatch):
    submitted = []
    monkeypatch.setattr(cli_cluster, "submit_job", lambda *a, **k: submitted.append(a))
    path = _bad_file(kind, tmp_path, monkeypatch)
    out = tmp_path / "out"
    args = [a.replace("OUT", str(out)) for a in COMMANDS[command]]
    code, err, _ = run_cli([command, str(path), *args], capsys)
    expected = {"not utf-8": "UTF-8", "a directory": "directory", "unreadable": "permission"}
    one_line_error(code, err, str(path), expected[kind])
    assert not out.exists() and not submitted


# ---- output paths -------------------------------------------------------------------------------
def test_output_path_that_is_a_file_is_left_untouched(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    code, err, _ = run_cli(["run", str(write_job(tmp_path / "j.yaml")), "-o", str(target)], capsys)
    one_line_error(code, err, str(target), "is a file", "-o")
    assert target.read_text() == "mine"
    under = target / "sub"
    code, err, _ = run_cli(["run", str(tmp_path / "j.yaml"), "-o", str(under)], capsys)
    one_line_error(code, err, f"inside {target}", "-o")
    code, err, _ = run_cli(["compare", "configs/compare_demo.yaml", "-o", str(target)], capsys)
    one_line_error(code, err, "is a file")
    assert target.read_text() == "mine"


def test_output_path_through_a_symlink_loop(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    job = str(write_job(tmp_path / "j.yaml"))
    for out in (loop, loop / "sub"):
        code, err, _ = run_cli(["run", job, "-o", str(out)], capsys)
        one_line_error(code, err, str(loop), "symlink")
    assert loop.is_symlink()


def test_output_directory_whose_parent_is_not_writable(tmp_path, capsys, monkeypatch):
    out = tmp_path / "locked" / "out"
    real = Path.mkdir

    def refuse(self, *args, **kwargs):  # root ignores permission bits: refuse like the OS would
        if self == out or out.is_relative_to(self) and self != tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    code, err, _ = run_cli(["run", str(write_job(tmp_path / "j.yaml")), "-o", str(out)], capsys)
    one_line_error(code, err, "permission denied", "-o")


@pytest.mark.parametrize("name", ["../../escaped", "..", "...", ".hidden", "a/b", "x" * 101])
def test_job_and_model_names_cannot_leave_the_output_directory(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path / "j.yaml")
    code, err, _ = run_cli(["run", str(job), "--set", f"name={json.dumps(name)}"], capsys)
    one_line_error(code, err, "name:", "cannot name a directory")
    model = {"ref": "demo-tiny-gpt2", "name": name}
    code, err, _ = run_cli(["check", str(write_job(job, models=[model]))], capsys)
    one_line_error(code, err, "models.0.name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.yaml"]


def test_a_model_ref_made_of_dots_gets_a_safe_directory_name():
    from runner.paths import dir_name_for_ref

    assert [dir_name_for_ref(r) for r in ("..", ".", "a/..", "x/y/")] == ["__", "_", "__", "y"]


# ---- numbers the schema bounds ------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    [
        "data.snr_db=.nan",
        "data.snr_db=.inf",
        "data.snr_db=-.inf",
        "data.snr_db=-1e308",
        "seed=1e23",
        "seed=-1",
        "data.seed=1e23",
    ],
)
def test_numbers_out_of_range_are_config_errors(override, tmp_path, capsys):
    out = tmp_path / "out"
    job = str(write_job(tmp_path / "j.yaml"))
    code, err, _ = run_cli(["run", job, "-o", str(out), "--set", override], capsys)
    one_line_error(code, err, override.split("=")[0])
    assert not out.exists()


# ---- cluster requests an embedded Ray cannot place ---------------------------------------------
@pytest.mark.parametrize(
    "cluster,expected",
    [
        ({"executor": "ray", "workers": 1000}, "need 1000 CPUs"),
        ({"executor": "ray", "workers": 1, "gpus_per_worker": 1}, "need 1 GPUs"),
    ],
)
def test_impossible_cluster_requests_fail_fast(cluster, expected, tmp_path, capsys, monkeypatch):
    if expected.endswith("GPUs"):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a machine without GPUs
    job = write_job(tmp_path / "j.yaml", cluster=cluster)
    out = tmp_path / "out"
    started = time.monotonic()
    code = main(["run", str(job), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert time.monotonic() - started < 30  # refused before Ray starts or the model loads
    assert not out.exists()


# ---- compare options ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ratios,expected", [("abc", "'abc' is not a number"), ("0.5", "ratios.0"), ("nan", "finite")]
)
def test_compare_ratios_are_checked_before_any_directory(ratios, expected, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "configs/compare_demo.yaml", "--ratios", ratios, "-o", str(out)]
    code, err, _ = run_cli(args, capsys)
    one_line_error(code, err, expected)
    assert not out.exists()


# ---- a full disk --------------------------------------------------------------------------------
def test_full_disk_is_one_line_with_the_space_needed_and_resume_continues(
    tmp_path, capsys, monkeypatch
):
    import stages.checkpoint as checkpoint

    real = checkpoint.save_file
    calls = {"n": 0}

    def full_on_second_save(tensors, filename, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the recover stage's model (the layers stage is saved)
            raise SafetensorError("Error while serializing: IoError(No space left on device)")
        return real(tensors, filename, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_on_second_save)
    job, out = str(small_job(tmp_path / "j.yaml")), tmp_path / "out"
    code, err, _ = run_cli(["run", job, "-o", str(out)], capsys)
    one_line_error(code, err, "No space left on device", "MiB (the model's weights)", "--resume")
    assert "01_recover" in err and len(err.splitlines()) == 1
    done = sorted(p.name for p in (out / "stages").iterdir() if not p.name.endswith(".json"))
    assert done == ["00_layers"], done  # complete stages or none, no temp directories

    def full_on_export(tensors, filename, **kwargs):
        if "/.checkpoint.tmp-" in filename:  # the export, assembled beside out/checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_on_export)
    code, err, _ = run_cli(["run", job, "-o", str(out), "--resume"], capsys)
    one_line_error(code, err, f"{out / 'checkpoint'}", "No space left on device", "MiB", "--resume")
    assert not (out / "checkpoint").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)
    code, err, _ = run_cli(["run", job, "-o", str(out), "--resume"], capsys)
    assert code == 0, err
    assert (out / "checkpoint" / "manifest.json").is_file()


def test_full_disk_anywhere_else_is_one_line(tmp_path, capsys, monkeypatch):
    import runner.events as events

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(events.EventLog, "emit", full)
    out = tmp_path / "out"
    code, err, _ = run_cli(["run", str(small_job(tmp_path / "j.yaml")), "-o", str(out)], capsys)
    one_line_error(code, err, "No space left on device", "events.jsonl")


# ---- submit -------------------------------------------------------------------------------------
def test_submit_token_file_that_is_not_text(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_cluster, "submit_job", lambda *a, **k: pytest.fail("submitted"))
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe\x00secret")
    job = str(write_job(tmp_path / "j.yaml"))
    args = ["submit", job, "--address", "http://127.0.0.1:9", "--token-file", str(token)]
    one_line_error(*run_cli(args, capsys)[:2], "--token-file", "UTF-8")


def test_submitted_job_with_malformed_yaml_reports_it_on_the_cluster_side(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv(cli_cluster.CONFIG_ENV, "models: [a\n  stages: {{\n")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # never contacted: the config fails first
    code, err, _ = run_cli(["run-submitted", str(tmp_path / "out")], capsys)
    one_line_error(code, err, "malformed YAML", "line")


# ---- perplexity file read as a stream -----------------------------------------------------------
class CountingReader:
    """A text stream that counts the characters handed out."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def read(self, n: int) -> str:
        chunk = self.text[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk


def test_perplexity_tokens_are_read_only_as_far_as_needed():
    from runner.lm_head import CHUNK_CHARS, token_ids_from

    tokenizer = tiny_tokenizer()
    words = [f"w{4 + i % 90}" for i in range(200_000)]  # ~1 MB on one line
    text = " ".join(words)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    for max_tokens in (10, 5_000, 60_000):
        reader = CountingReader(text)
        ids = token_ids_from(reader, tokenizer, max_tokens)
        assert ids == whole[:max_tokens]  # chunk borders fall between words: same tokens
        assert reader.pos <= 4 * max_tokens + 2 * CHUNK_CHARS  # not the whole file
    reader = CountingReader(text)
    assert token_ids_from(reader, tokenizer, 10**9) == whole and reader.pos == len(text)


def test_perplexity_text_without_whitespace_is_still_bounded():
    from runner.lm_head import CHUNK_CHARS, token_ids_from

    tokenizer, seen = tiny_tokenizer(), []

    def spy(text, **kwargs):
        seen.append(len(text))
        return tokenizer(text, **kwargs)

    reader = CountingReader("x" * (20 * CHUNK_CHARS))  # one unknown "word" of 1.3 M characters
    assert len(token_ids_from(reader, spy, 3)) == 3
    assert reader.pos <= 3 * CHUNK_CHARS and max(seen) <= CHUNK_CHARS  # cut, never accumulated


# ---- fine-tune cache ----------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage weights", "other shapes", "record not an object"])
def test_damaged_fine_tune_cache_entry_is_trained_again(damage, tmp_path):
    from safetensors.torch import save_model

    from runner.finetune import _load_cached

    model, entry = tiny_gpt2(), tmp_path / "entry"
    entry.mkdir()
    (entry / "finetune.json").write_text('{"steps": 1}')
    save_model(tiny_gpt2(seed=1, n_inner=24), str(entry / "model.safetensors"))
    if damage == "garbage weights":
        (entry / "model.safetensors").write_bytes(b"\x00" * 64)
    elif damage == "record not an object":
        save_model(tiny_gpt2(seed=1), str(entry / "model.safetensors"))
        (entry / "finetune.json").write_text("[1]")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logged = []
    assert _load_cached(model, entry, logged.append) is None
    assert "fine-tuning again" in logged[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
