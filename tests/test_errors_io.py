"""Files, folders and disks the user can fix: one `error:` line, exit 2, nothing half-written.

Job files that are not UTF-8 or cannot be read, output paths the OS refuses, model folders that
are not what they claim, tampered checkpoints, a full disk (docs/ERRORS.md).
"""

import errno
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_job
from safetensors import SafetensorError
from tiny_models import tiny_gpt2, tiny_tokenizer

import runner.cli_cluster as cli_cluster
from runner.cli import main
from stages.checkpoint import save_checkpoint


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip(), captured.out


def one_line_error(code, err, *expected):
    assert code == 2, err
    assert err.startswith("error:") and "Traceback" not in err, err
    for words in expected:
        assert words in err, err


def write_job(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(tiny_job(**overrides)))
    return path


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


# ---- model folders ------------------------------------------------------------------------------
def hf_folder(tmp_path: Path, name="model", **overrides) -> Path:
    """A tiny GPT-2 classifier with 10 labels (the bearing task's) and its tokenizer."""
    path = tmp_path / name
    tiny_gpt2(num_labels=10, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _config_list(d):
    (d / "config.json").write_text("[1, 2]")


def _config_latin1(d):
    (d / "config.json").write_bytes(b'{"model_type": "gpt2", "note": "caf\xe9"}')


def _garbage_weights(d):
    (d / "model.safetensors").write_bytes(b"\xff" * 1000)


def _truncated_weights(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _pickle_only(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")


def _no_tokenizer(d):
    for f in d.glob("tokenizer*"):
        f.unlink()
    (d / "special_tokens_map.json").unlink(missing_ok=True)


def _edited_shape(d):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"n_inner": 24}))


def _edited_shape_new_head(d):
    config = json.loads((d / "config.json").read_text())
    labels = {str(i): f"L{i}" for i in range(3)}
    (d / "config.json").write_text(json.dumps(config | {"n_inner": 24, "id2label": labels}))


FOLDERS = {
    "config.json is a list": (_config_list, "JSON object"),
    "config.json not UTF-8": (_config_latin1, "UTF-8"),
    "garbage safetensors": (_garbage_weights, "not a readable safetensors file"),
    "truncated safetensors": (_truncated_weights, "not a readable safetensors file"),
    "pytorch_model.bin only": (_pickle_only, "save_pretrained"),
    "no tokenizer": (_no_tokenizer, "vocab.txt, spiece.model"),
    "weights do not match config": (_edited_shape, "c_fc.bias has shape [48]"),
    "... with a new head": (_edited_shape_new_head, "c_fc.bias has shape [48]"),
}


@pytest.mark.parametrize("case", sorted(FOLDERS))
def test_broken_model_folders_are_one_line_and_leave_nothing(case, tmp_path, capsys):
    damage, expected = FOLDERS[case]
    folder = hf_folder(tmp_path)
    damage(folder)
    out = tmp_path / "out"
    job = write_job(tmp_path / "j.yaml", models=[str(folder)])
    code, err, _ = run_cli(["run", str(job), "-o", str(out)], capsys)
    one_line_error(code, err, expected)
    assert "above report" not in err
    assert not out.exists(), "job.yaml left behind"


@pytest.mark.parametrize("case", ["config.json is a list", "garbage safetensors"])
def test_validate_refuses_broken_plain_folders(case, tmp_path, capsys):
    damage, expected = FOLDERS[case]
    folder = hf_folder(tmp_path)
    damage(folder)
    args = ["validate", str(folder), "--device", "dgx_spark", "--analytic-only"]
    one_line_error(*run_cli(args, capsys)[:2], expected)


def test_validate_refuses_pickle_only_folders_as_checkpoint_and_as_dense(tmp_path, capsys):
    good, pickled = hf_folder(tmp_path, "good"), hf_folder(tmp_path, "pickled")
    _pickle_only(pickled)
    for args in ([str(pickled)], [str(good), "--dense", str(pickled)]):
        cmd = ["validate", *args, "--device", "dgx_spark", "--analytic-only"]
        one_line_error(*run_cli(cmd, capsys)[:2], "only pytorch_model.bin", "save_pretrained")


def test_validate_probe_measures_a_relative_path_from_the_callers_directory(
    tmp_path, capsys, monkeypatch
):
    import runner.validate as validate

    seen = []
    fake = {"oom": False, "peak_bytes": 1000, "latency_ms": 1.0, "device": "cpu"}
    monkeypatch.setattr(validate, "measure_inference", lambda ref, **kw: seen.append(ref) or fake)
    hf_folder(tmp_path, "rel")
    monkeypatch.chdir(tmp_path)
    code, err, _ = run_cli(["validate", "rel", "--device", "dgx_spark"], capsys)
    assert code == 0, err
    assert seen == [tmp_path / "rel"]  # the probe runs in the repository: it needs the full path


# ---- tampered checkpoints -----------------------------------------------------------------------
def _flip_a_byte(d):
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-3] ^= 1
    (d / "model.safetensors").write_bytes(bytes(data))


def _edit_manifest(d):
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"]["config.json"]["size"] += 1
    (d / "manifest.json").write_text(json.dumps(manifest))


TAMPERING = {
    "flipped byte": (_flip_a_byte, "changed file model.safetensors"),
    "deleted manifest": (lambda d: (d / "manifest.json").unlink(), "missing file manifest.json"),
    "edited manifest": (_edit_manifest, "changed file config.json"),
    "extra file": (lambda d: (d / "notes.txt").write_text("hi"), "unexpected file notes.txt"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return save_checkpoint(tiny_gpt2(), tiny_tokenizer(), tmp_path_factory.mktemp("c") / "ckpt")


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_validate_verifies_the_manifest_first(case, exported, tmp_path, capsys):
    damage, expected = TAMPERING[case]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(exported, ckpt)
    damage(ckpt)
    base = ["validate", str(ckpt), "--device", "dgx_spark", "--analytic-only"]
    one_line_error(*run_cli(base, capsys)[:2], expected, "--no-verify")
    code, err, out = run_cli([*base, "--no-verify"], capsys)
    assert code == 0, err
    assert "NOT VERIFIED" in out


def test_validate_of_an_untouched_checkpoint_fits(exported, capsys):
    code, err, out = run_cli(
        ["validate", str(exported), "--device", "dgx_spark", "--analytic-only"], capsys
    )
    assert code == 0 and "FITS" in out and "NOT VERIFIED" not in out, err


def test_a_workload_too_big_to_measure_does_not_fit_on_the_analytic_figure(exported, capsys):
    """--batch 1e9 cannot be run here (it would swap or be OOM-killed): the analytic peak
    answers, exit 3, and the output says it was not measured."""
    args = ["validate", str(exported), "--device", "dgx_spark", "--batch", "1000000000"]
    code, err, out = run_cli(args, capsys)
    assert code == 3, err
    assert "DOES NOT FIT (basis: analytic)" in out and "not measured" in out


def test_a_failed_measurement_over_budget_is_a_does_not_fit(exported, capsys, monkeypatch):
    import runner.validate as validate

    def crash(ref, **kwargs):
        raise validate.ProbeError(f"measuring {ref}: probe exited with 1: can't allocate memory")

    monkeypatch.setattr(validate, "measure_inference", crash)
    monkeypatch.setattr(validate, "too_big_to_measure", lambda *a: None)
    args = ["validate", str(exported), "--device", "dgx_spark", "--budget-bytes", "1000"]
    code, err, out = run_cli(args, capsys)
    assert code == 3 and "measurement failed" in out, err
    code, err, _ = run_cli(["validate", str(exported), "--device", "dgx_spark"], capsys)
    one_line_error(code, err, "probe exited")  # within budget a failed probe stays an error


def test_binary_device_profile_names_the_file(exported, tmp_path, capsys):
    profile = tmp_path / "device.yaml"
    profile.write_bytes(bytes(range(256)))
    args = ["validate", str(exported), "--device", str(profile), "--analytic-only"]
    one_line_error(*run_cli(args, capsys)[:2], str(profile), "UTF-8")


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


def test_lm_head_of_a_pickle_only_folder_says_how_to_convert(tmp_path):
    from transformers import GPT2LMHeadModel

    from runner.lm_head import load_lm_head
    from runner.models import ModelError

    folder = tmp_path / "lm"
    tiny_gpt2(GPT2LMHeadModel).save_pretrained(folder)
    _pickle_only(folder)
    with pytest.raises(ModelError, match="only pytorch_model.bin.*save_pretrained"):
        load_lm_head(folder, "lm")
