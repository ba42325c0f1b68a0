"""The hostile-user probe of issue 23: silent garbage in, tracebacks and small defects. Each bad
input is refused in one `error:` line (exit 2) or handled, and nothing is left behind; every JSON
file the project writes stays RFC 8259 JSON (no bare NaN/Infinity)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_checks import one_line_error, run_cli, write_job
from safetensors.torch import load_file, save_file
from tiny_models import tiny_gpt2, tiny_tokenizer

from runner.data.bearing import DataConfig
from runner.demo_models import get_demo_model
from runner.events import EventLog
from stages.atomic import write_json_atomic
from stages.checkpoint import save_checkpoint, verify_manifest


def strict_json(text: str):
    """json.loads that rejects NaN / Infinity / -Infinity (RFC 8259 has no such numbers)."""

    def refuse(constant):
        raise ValueError(f"non-RFC JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def hf_folder(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    tiny_gpt2(num_labels=10).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def edit_weights(folder: Path, edit) -> None:
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


# ---- 6: silent garbage in -----------------------------------------------------------------------
def _one_nan(weights):
    weights["transformer.h.0.mlp.c_fc.weight"][0, 0] = math.nan


def _int8(weights):
    name = "transformer.h.0.mlp.c_fc.weight"
    weights[name] = (weights[name] * 100).to(torch.int8)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (_one_nan, "the weights hold NaN or infinite values (first in transformer.h.0.mlp.c_fc"),
        (_int8, "transformer.h.0.mlp.c_fc.weight is stored as integers (I8) but config.json has"),
    ],
)
def test_nan_and_integer_weights_are_refused(edit, expected, tmp_path, capsys):
    folder = hf_folder(tmp_path)
    edit_weights(folder, edit)
    capsys.readouterr()
    out = tmp_path / "out"
    job = write_job(tmp_path / "j.yaml", models=[str(folder)])
    code, err, _ = run_cli(["run", str(job), "-o", str(out)], capsys)
    one_line_error(code, err, expected)
    assert len(err.splitlines()) == 1 and not out.exists()


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, capsys):
    job = tmp_path / "j.yaml"
    job.write_text("name: x\ntarget: {ratio: 2}\nmodels: [demo-tiny-gpt2]\ntarget: {ratio: 3}\n")
    code, err, _ = run_cli(["check", str(job)], capsys)
    one_line_error(code, err, "line 4", "duplicate key 'target' (first given at line 2)")
    nested = tmp_path / "n.yaml"
    nested.write_text("name: x\nstages:\n  - {kind: layers, count: 1, count: 2}\n")
    code, err, _ = run_cli(["check", str(nested)], capsys)
    one_line_error(code, err, "duplicate key 'count'")
    merged = tmp_path / "m.yaml"  # a merge key then an explicit key: not a duplicate
    merged.write_text(
        "base: &b {ratio: 2}\nname: x\nmodels: [demo-tiny-gpt2]\n"
        "stages: [{kind: layers, count: 1}]\ntarget: {<<: *b, ratio: 3}\n"
    )
    code, err, _ = run_cli(["check", str(merged)], capsys)
    assert "duplicate" not in err


def test_json_writers_never_write_nan_or_infinity(tmp_path, capsys):
    data = {"final": {"accuracy": math.nan, "params": 3}, "losses": [1.0, math.inf, -math.inf]}
    write_json_atomic(tmp_path / "report.json", data)
    written = strict_json((tmp_path / "report.json").read_text())
    assert written == {"final": {"accuracy": None, "params": 3}, "losses": [1.0, None, None]}
    err = capsys.readouterr().err
    assert "report.json: non-finite numbers (NaN/Infinity) written as null at" in err
    assert "final.accuracy, losses.1, losses.2" in err
    log = EventLog(tmp_path / "events.jsonl")
    log.emit(
        "recover_end", stage="r", version=1, last_loss=math.nan, scores=torch.tensor([math.inf])
    )
    (line,) = (tmp_path / "events.jsonl").read_text().splitlines()
    event = strict_json(line)
    assert event["last_loss"] is None and event["scores"] == [None]
    assert "events.jsonl: non-finite numbers" in capsys.readouterr().err


# ---- 7: tracebacks ------------------------------------------------------------------------------
def test_an_infinite_source_weight_is_a_config_error_and_leaves_nothing(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("\n\n".join(f"document {i} with words" for i in range(8)))
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "j.yaml", task="causal_lm", models=["smollm2-135m"],
        data={"sources": [{"path": str(text), "weight": math.inf}]},
    )  # fmt: skip
    code, err, _ = run_cli(["run", str(job), "-o", str(out)], capsys)
    one_line_error(code, err, "data.sources.0.weight: Input should be a finite number")
    assert not out.exists()


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, "".join("  " * i + "a:\n" for i in range(5000)) + "  " * 5000 + "b: 1\n"],
    ids=["100000 brackets", "5000 mappings"],
)
def test_deeply_nested_yaml_is_one_config_error(text, tmp_path, capsys):
    job = tmp_path / "deep.yaml"
    job.write_text(text)
    for command in (["check", str(job)], ["run", str(job), "-o", str(tmp_path / "out")]):
        code, err, _ = run_cli(command, capsys)
        one_line_error(code, err, "nested more than 64 levels deep")
        assert "RecursionError" not in err
    assert not (tmp_path / "out").exists()


def test_a_truncated_demo_cache_entry_is_trained_again(tmp_path, capsys):
    data = DataConfig(samples_per_class_per_load=4, window=1024, calibration_size=8)
    model, _ = get_demo_model("demo-tiny-gpt2", cache_dir=tmp_path, data_cfg=data)
    (entry,) = tmp_path.iterdir()
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    again, _ = get_demo_model("demo-tiny-gpt2", cache_dir=tmp_path, data_cfg=data)
    assert "cached copy failed verification" in capsys.readouterr().err
    verify_manifest(entry)  # rebuilt in place, whole
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seeded training


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return save_checkpoint(tiny_gpt2(num_labels=10), tiny_tokenizer(), tmp_path / "ckpt")


@pytest.mark.parametrize(
    "files, expected",
    [
        ([], "manifest.json lists no files"),
        ({}, "manifest.json lists no files"),
        ({"config.json": {"sha256": "0" * 64}}, "the entry for config.json has no integer size"),
        ({"config.json": "x"}, "manifest.json: bad entry 'config.json'"),
        ({"../outside": {"size": 1, "sha256": "0"}}, "bad entry '../outside'"),
    ],
)
def test_a_hand_edited_manifest_is_one_line_in_export_and_validate(
    checkpoint, tmp_path, capsys, files, expected
):
    (checkpoint / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))
    commands = (
        ["export", str(checkpoint), "--format", "hf", "-o", str(tmp_path / "hf")],
        ["validate", str(checkpoint), "--device", "dgx_spark", "--analytic-only"],
    )
    for command in commands:
        code, err, _ = run_cli(command, capsys)
        one_line_error(code, err, expected)
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_a_nul_byte_in_an_output_path_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    """Found by the fuzz test when it drew new cases each run (`batch F.yaml -o $'\\x00'`)."""
    monkeypatch.chdir(tmp_path)
    job = write_job(tmp_path / "j.yaml")
    family = Path(__file__).resolve().parents[1] / "configs" / "families" / "tiny.yaml"
    commands = [
        ["batch", str(family), "-o", "\x00"],
        ["run", str(job), "-o", "out\x00"],
        ["compare", str(Path(family).parents[1] / "compare_demo.yaml"), "-o", "\x00"],
        ["export", str(checkpoint), "--format", "hf", "-o", "x\x00"],
        ["submit", str(job), "--address", "http://127.0.0.1:9", "--token-file", "\x00"],
    ]
    for command in commands:
        code, err, _ = run_cli(command, capsys)
        one_line_error(code, err)
        assert "NUL byte" in err or "not a file name" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "j.yaml"]


# ---- 7: the streamed path gives the in-memory path's one line -----------------------------------
@pytest.fixture(scope="module")
def streamed_workspace(tmp_path_factory):
    from test_causal_lm import lm_job, lm_workspace
    from transformers import AutoModelForCausalLM

    root = lm_workspace(tmp_path_factory.mktemp("lm"))
    sharded = root / "sharded"
    AutoModelForCausalLM.from_pretrained(root / "model").save_pretrained(
        sharded, max_shard_size="20KB"
    )
    for tok in (root / "model").glob("tokenizer*"):
        shutil.copy(tok, sharded)
    raw = lm_job(root) | {"sia": {"enabled": False}, "evaluation": {}}
    raw["stages"] = [{"kind": "layers", "criterion": "block_influence", "count": 1}]
    raw["calibration"]["streamed"] = True
    raw["models"] = [{"ref": "MODEL", "max_length": 24}]
    return sharded, raw


def _missing_shard(folder: Path) -> None:
    sorted(folder.glob("model-*.safetensors"))[1].unlink()


def _fewer_kv_heads(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_key_value_heads": 1}))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_missing_shard, "-of-00009.safetensors is listed in model.safetensors.index.json but missing"),
        (_fewer_kv_heads, "k_proj.weight has shape [16, 32] in the checkpoint but config.json makes it [8, 32]"),
    ],
)  # fmt: skip
def test_streamed_job_on_a_damaged_folder_is_one_line(
    streamed_workspace, tmp_path, capsys, damage, expected
):
    sharded, raw = streamed_workspace
    folder = tmp_path / "model"
    shutil.copytree(sharded, folder)
    damage(folder)
    raw = json.loads(json.dumps(raw).replace('"MODEL"', json.dumps(str(folder))))
    job = tmp_path / "j.yaml"
    job.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    code, err, _ = run_cli(["run", str(job), "-o", str(out)], capsys)
    one_line_error(code, err, expected)
    assert not out.exists()


# ---- 8: small ones ------------------------------------------------------------------------------
def test_a_fifo_as_a_data_source_says_what_it_is(tmp_path, capsys):
    from test_causal_lm import lm_workspace  # lazy: a tiny causal LM folder, not SmolLM2's

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    model = str(lm_workspace(tmp_path / "lm") / "model")
    capsys.readouterr()  # the workspace's own save progress is not the job's output
    job = write_job(
        tmp_path / "j.yaml", task="causal_lm", models=[model],
        data={"sources": [{"path": str(fifo)}]},
    )  # fmt: skip
    code, err, _ = run_cli(["run", str(job), "-o", str(tmp_path / "out")], capsys)
    one_line_error(code, err, f"{fifo} is a named pipe (FIFO), not a file or folder of text")
    assert "not found" not in err


def test_huge_names_are_cut_in_messages(tmp_path, capsys):
    job = write_job(tmp_path / "name.yaml", name="a" * 1_000_000)
    code, err, _ = run_cli(["run", str(job), "-o", str(tmp_path / "o1")], capsys)
    one_line_error(code, err, "...[999,880 characters]...", "cannot name a directory")
    assert len(err) < 2000
    job = write_job(tmp_path / "ref.yaml", models=["/x/" + "b" * 1_000_000])
    code, err, out = run_cli(["run", str(job), "-o", str(tmp_path / "o2")], capsys)
    one_line_error(code, err, "path does not exist", "characters]")  # was OSError: name too long
    assert len(err) + len(out) < 2000
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_newline_in_the_model_path_keeps_report_md_titled(tmp_path, capsys):
    folder = tmp_path / "odd\nname"
    tiny_gpt2(num_labels=10).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    job = write_job(
        tmp_path / "j.yaml", models=[{"ref": str(folder), "name": "odd"}],
        stages=[{"kind": "layers", "criterion": "block_influence", "count": 1}],
        sia={"enabled": False}, target={}, output={"progress": False, "plots": False},
    )  # fmt: skip
    out = tmp_path / "out"
    code, err, _ = run_cli(["run", str(job), "-o", str(out), "--quiet"], capsys)
    assert code == 0, err
    title = (out / "report.md").read_text().splitlines()[0]
    assert title == f"# Compression report: {tmp_path}/odd\\nname"
