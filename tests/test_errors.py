"""Bad input gets one clear line, exit status 2, and leaves nothing behind (docs/ERRORS.md)."""

import json

import pytest
import yaml
from cli_checks import run_cli
from conftest import TINY_DATA, tiny_job

from runner.cli.main import main


def write_job(tmp_path, **overrides):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job(**overrides)))
    return path


def fake_hf_dir(tmp_path, config: dict, name="model"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def saved_model(tmp_path, model, name):
    from runner.data.bearing import DataConfig
    from runner.models import load_model

    _, tokenizer = load_model("demo-tiny-gpt2", progress=False, data_cfg=DataConfig(**TINY_DATA))
    d = tmp_path / name
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def case_unsupported_architecture(tmp_path):
    from transformers import T5Config, T5ForSequenceClassification

    cfg = T5Config(
        vocab_size=400, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, num_labels=10
    )
    return str(saved_model(tmp_path, T5ForSequenceClassification(cfg), "t5")), "supported"


def case_vocab_mismatch(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(vocab_size=5, n_embd=16, n_layer=1, n_head=2, num_labels=10, pad_token_id=0)
    return str(saved_model(tmp_path, GPT2ForSequenceClassification(cfg), "small_vocab")), "vocab"


CASES = {
    # name: (override dict or callable(tmp_path) -> (model ref, expected words), expected words)
    "unknown key": ({"bogus_key": 1}, "bogus_key"),
    "fraction out of range": (
        {"stages": [{"kind": "layers", "criterion": "block_influence", "ratio": 1.5}]},
        "stages.0.ratio",
    ),
    "zero ratio": (
        {"stages": [{"kind": "heads", "criterion": "wanda", "ratio": 0}]},
        "stages.0.ratio",
    ),
    "remove every layer": (
        {"stages": [{"kind": "layers", "criterion": "block_influence", "count": 99}]},
        "would leave fewer",
    ),
    "unreachable target": ({"target": {"ratio": 1000.0}}, "unprunable"),
    "model path missing": ({"models": ["/nonexistent/model/dir"]}, "does not exist"),
    "calibration too small": (
        {"data": {"samples_per_class_per_load": 6, "calibration_size": 2}},
        "calibration",
    ),
    "unknown criterion": (
        {"stages": [{"kind": "channels", "criterion": "vibes", "count": 1}]},
        "criterion",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_job_input_is_one_line_exit_2_and_writes_nothing(name, tmp_path, capsys):
    overrides, expected = CASES[name]
    out = tmp_path / "out"
    code, err, _ = run_cli(["run", str(write_job(tmp_path, **overrides)), "-o", str(out)], capsys)
    assert code == 2, err
    assert err.startswith("error:") and expected in err
    assert "Traceback" not in err
    assert not out.exists(), "a failed bad-input run left files behind"


@pytest.mark.parametrize(
    "make", [case_unsupported_architecture, case_vocab_mismatch], ids=lambda f: f.__name__
)
def test_bad_model_directories(make, tmp_path, capsys):
    ref, expected = make(tmp_path)
    out = tmp_path / "out"
    code, err, _ = run_cli(["run", str(write_job(tmp_path, models=[ref])), "-o", str(out)], capsys)
    assert code == 2 and expected in err.lower(), err
    assert not out.exists()


def test_directory_that_is_not_a_hf_model(tmp_path, capsys):
    d = tmp_path / "not_a_model"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    code, err, _ = run_cli(
        ["run", str(write_job(tmp_path, models=[str(d)])), "-o", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "config.json" in err


def test_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [a\n  stages: {{\n")
    code, err, _ = run_cli(["check", str(path)], capsys)
    assert code == 2 and "malformed YAML" in err and "line" in err


def test_check_lists_every_problem(tmp_path, capsys):
    path = write_job(
        tmp_path, bogus=1, seed="x", stages=[{"kind": "heads", "criterion": "l2", "ratio": 2}]
    )
    code, err, _ = run_cli(["check", str(path)], capsys)
    assert code == 2
    for where in ("bogus", "seed", "stages.0.ratio"):
        assert where in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="bogus"):
        main(["--debug", "check", str(write_job(tmp_path, bogus=1))])


def test_output_dir_of_another_job_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.yaml").write_text("name: someone-else\n")
    (out / "report.json").write_text("{}")
    code, err, _ = run_cli(["run", str(write_job(tmp_path)), "-o", str(out)], capsys)
    assert code == 2 and "--resume" in err and "--force" in err
    assert (out / "report.json").read_text() == "{}"  # nothing of theirs was touched
    code, err, _ = run_cli(["run", str(write_job(tmp_path)), "-o", str(out), "--resume"], capsys)
    assert code == 2 and "different config" in err


def test_force_refuses_to_delete_a_directory_that_is_not_a_job(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("...")
    code, err, _ = run_cli(["run", str(write_job(tmp_path)), "-o", str(out), "--force"], capsys)
    assert code == 2 and "refusing" in err
    assert (out / "thesis.tex").exists()
