"""Model folders and checkpoints the user can fix: one `error:` line, exit 2, nothing written.

Folders that are not what they claim (config, weights, tokenizer) and exported checkpoints
tampered with after their manifest was written (docs/ERRORS.md).
"""

import json
import shutil
from pathlib import Path

import pytest
from cli_checks import one_line_error, run_cli, write_job
from tiny_models import tiny_gpt2, tiny_tokenizer

from stages.checkpoint import save_checkpoint


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


def _more_layers_than_weights(d):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"n_layer": 200_000}))


FOLDERS = {
    "config.json is a list": (_config_list, "JSON object"),
    "config.json not UTF-8": (_config_latin1, "UTF-8"),
    "garbage safetensors": (_garbage_weights, "not a readable safetensors file"),
    "truncated safetensors": (_truncated_weights, "not a readable safetensors file"),
    "pytorch_model.bin only": (_pickle_only, "save_pretrained"),
    "no tokenizer": (_no_tokenizer, "vocab.txt, spiece.model"),
    "weights do not match config": (_edited_shape, "c_fc.bias has shape [48]"),
    "... with a new head": (_edited_shape_new_head, "c_fc.bias has shape [48]"),
    "config declares 200,000 layers": (_more_layers_than_weights, "declares 200000 layers but"),
}


@pytest.mark.parametrize("case", sorted(FOLDERS))
def test_broken_model_folders_are_one_line_and_leave_nothing(case, tmp_path, capsys):
    damage, expected = FOLDERS[case]
    folder = hf_folder(tmp_path)
    damage(folder)
    capsys.readouterr()  # save_pretrained's progress bar, shown until a command quiets libraries
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


def test_lm_head_of_a_pickle_only_folder_says_how_to_convert(tmp_path):
    from transformers import GPT2LMHeadModel

    from runner.lm_head import load_lm_head
    from runner.models import ModelError

    folder = tmp_path / "lm"
    tiny_gpt2(GPT2LMHeadModel).save_pretrained(folder)
    _pickle_only(folder)
    with pytest.raises(ModelError, match="only pytorch_model.bin.*save_pretrained"):
        load_lm_head(folder, "lm")
