"""`cascade export -o`: what the output path may be. An export never destroys the run it came from,
an unrelated directory or file, or the checkpoint itself; --force replaces an earlier export only."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_checks import one_line_error, run_cli
from tiny_models import tiny_llama
from transformers import LlamaForCausalLM

from stages.checkpoint import save_checkpoint


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished run as `cascade run` leaves it: job.yaml, stages/, report, checkpoint/."""
    run = tmp_path / "run"
    (run / "stages" / "00_layers").mkdir(parents=True)
    (run / "stages" / "00_layers" / "metrics.json").write_text("{}")
    (run / "job.yaml").write_text("name: x\n")
    (run / "report.json").write_text("{}")
    save_checkpoint(tiny_llama(LlamaForCausalLM, vocab_size=64), None, run / "checkpoint")
    return run


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def export(capsys, *args):
    return run_cli(["export", *map(str, args)], capsys)


@pytest.mark.parametrize("force", [False, True])
def test_export_into_its_own_run_directory_is_refused_and_the_run_is_intact(run_dir, capsys, force):
    before = snapshot(run_dir)
    flags = ["--force"] if force else []
    code, err, _ = export(capsys, run_dir / "checkpoint", "--format", "hf", "-o", run_dir, *flags)
    one_line_error(code, err, "contains the checkpoint", "choose another -o")
    code, err, _ = export(
        capsys, run_dir / "checkpoint", "--format", "hf", "-o", run_dir / "checkpoint" / "x", *flags
    )
    one_line_error(code, err, "is inside the checkpoint")
    code, err, _ = export(
        capsys, run_dir / "checkpoint", "--format", "hf", "-o", run_dir / "checkpoint", *flags
    )
    one_line_error(code, err, "is the checkpoint itself")
    assert snapshot(run_dir) == before


def test_an_existing_directory_or_file_is_refused_and_force_replaces_only_an_export(
    run_dir, tmp_path, capsys
):
    ckpt = run_dir / "checkpoint"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    text = tmp_path / "notes.txt"
    text.write_text("mine too")
    for target, fmt in ((notes, "hf"), (text, "gguf")):
        code, err, _ = export(capsys, ckpt, "--format", fmt, "-o", target)
        one_line_error(code, err, f"{target}: already exists", "--force")
        code, err, _ = export(capsys, ckpt, "--format", fmt, "-o", target, "--force")
        one_line_error(code, err, f"is not an earlier {fmt} export", "refusing to replace it")
    assert (notes / "todo.txt").read_text() == "mine" and text.read_text() == "mine too"

    target = tmp_path / "exported"
    assert export(capsys, ckpt, "--format", "hf", "-o", target)[0] == 0
    code, err, _ = export(capsys, ckpt, "--format", "hf", "-o", target)
    one_line_error(code, err, "already exists")
    code, err, out = export(capsys, ckpt, "--format", "hf", "-o", target, "--force")
    assert code == 0, err
    assert (target / "config.json").is_file() and out.strip() == str(target)


def test_output_dot_is_a_one_line_refusal(run_dir, tmp_path, capsys, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err, _ = export(capsys, run_dir / "checkpoint", "--format", "hf", "-o", ".")
    one_line_error(code, err, f"{elsewhere}: already exists")
    monkeypatch.chdir(run_dir)
    code, err, _ = export(capsys, run_dir / "checkpoint", "--format", "gguf", "-o", ".")
    one_line_error(code, err, "contains the checkpoint")
